"""Token-choice top-k router (Mixtral / Switch style).

Shapes: T tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("softmax_topk",)


class TokenChoiceTopKRouter(nn.Module):
    """softmax over all E experts, keep the top K, optionally renormalise the K weights to sum 1.

    `gate` is nn.Linear(H, E, bias=False): its weight [E, H] is Mixtral's `gate.weight`.
    deterministic=True breaks probability ties towards the lower expert index (stable sort);
    torch.topk gives no tie-breaking guarantee, which matters for parity tests.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 renormalize: bool = True, deterministic: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.deterministic = deterministic
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x_TH: torch.Tensor):
        """Returns (weights_TK fp32, expert_ids_TK int64, logits_TE fp32, probs_TE fp32)."""
        # The router runs in fp32 even under bf16 autocast: bf16 logits (8-bit mantissa) flip
        # near-tied top-k choices and make softmax/z-loss noisy ("selective precision",
        # Switch Transformer sec. 2.4; ST-MoE). The gate is tiny (H x E), so fp32 is cheap.
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.gate.weight.float())
            probs_TE = torch.softmax(logits_TE, dim=-1)
            if self.deterministic:
                sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
                topk_TK, expert_ids_TK = sorted_TE[:, : self.top_k], order_TE[:, : self.top_k]
            else:
                topk_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            if self.renormalize:
                topk_TK = topk_TK / topk_TK.sum(dim=-1, keepdim=True)
        return topk_TK, expert_ids_TK, logits_TE, probs_TE
