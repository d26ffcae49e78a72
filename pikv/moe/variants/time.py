"""Time-MoE's sparse layer (Shi et al., ICLR 2025, eq. 4-6; the Qwen2-MoE block it builds on):
routed softmax top-k experts plus one shared expert whose output is scaled by a per-token
sigmoid gate, y = sum_k g_k E_k(x) + sigmoid(x w_s) S(x).

The routed part is MoELayer's (expert parallelism, balancing loss, metrics unchanged); the gated
shared expert is replicated like any dense weight (not under a module named `experts`).
Time-MoE does not renormalise the top-k gate weights (norm_topk_prob=False), hence
renormalize=False by default here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from pikv.moe.experts import FeedForward
from pikv.moe.layer import _BASE_OPTIONS, MOE_BUILDERS, MOE_CHECKS, MOE_OPTIONS, MoELayer, _build_base, _check_base


class TimeMoELayer(MoELayer):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 num_shared_experts: int = 1, shared_ffn_hidden_size: Optional[int] = None, **options: Any):
        super().__init__(hidden_size, num_experts, top_k, ffn_hidden_size, num_shared_experts=0, **options)
        width = num_shared_experts * (shared_ffn_hidden_size or ffn_hidden_size)
        self.shared_expert = FeedForward(hidden_size, width) if num_shared_experts > 0 else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if num_shared_experts > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        y = super().forward(x)
        if self.shared_expert is None:
            return y
        return y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def _build_time(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                renormalize: bool = False, num_shared_experts: int = 1, **base_options: Any) -> TimeMoELayer:
    return _build_base(hidden_size, num_experts, top_k, ffn_hidden_size, renormalize=renormalize,
                       num_shared_experts=num_shared_experts, **base_options, layer_cls=TimeMoELayer)


def _check_time(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                renormalize: bool = False, num_shared_experts: int = 1, **base_options: Any) -> None:
    _check_base(hidden_size, num_experts, top_k, ffn_hidden_size, renormalize=renormalize,
                num_shared_experts=num_shared_experts, **base_options)


MOE_BUILDERS["time"] = _build_time
MOE_CHECKS["time"] = _check_time
MOE_OPTIONS["time"] = _BASE_OPTIONS
