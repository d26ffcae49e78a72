"""The MoE layer (router -> dispatcher -> grouped experts -> combine) and `create_moe`.

Shapes: T tokens, H hidden, E experts, K experts per token, N = T*K dispatched rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from pikv.moe import losses
from pikv.moe.dispatch import LocalDispatcher
from pikv.moe.experts import GroupedExperts
from pikv.moe.router import ROUTERS, TokenChoiceTopKRouter


class MoELayer(nn.Module):
    """Token-choice top-k sparse MoE; defaults are exactly Mixtral's sparse MoE block.

    After each forward: `aux_loss` (load balancing), `z_loss` (scalar tensors with grad) and
    `metrics` (detached tensors: tokens_per_expert [E], dropped_fraction, router_entropy).
    Nothing is .item()-ed here: that would sync the GPU every layer.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 router: str = "softmax_topk", renormalize: bool = True,
                 capacity_factor: Optional[float] = None, deterministic: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = TokenChoiceTopKRouter(hidden_size, num_experts, top_k,
                                            renormalize=renormalize, deterministic=deterministic)
        self.dispatcher = LocalDispatcher()  # replaced by an all-to-all dispatcher under EP
        self.experts = GroupedExperts(num_experts, hidden_size, ffn_hidden_size)
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.metrics: dict[str, torch.Tensor] = {}

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert: ceil(capacity_factor * T * K / E) (GShard), None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        x_TH = x.reshape(-1, self.hidden_size)
        weights_TK, expert_ids_TK, logits_TE, probs_TE = self.router(x_TH)
        x_NH, counts_E, state = self.dispatcher.dispatch(
            x_TH, expert_ids_TK, self.num_experts, self.capacity(x_TH.shape[0]))
        y_NH = self.experts(x_NH, counts_E)
        y_TH = self.dispatcher.combine(y_NH, weights_TK, state)

        self.aux_loss = losses.load_balancing_loss(probs_TE, expert_ids_TK)
        self.z_loss = losses.z_loss(logits_TE)
        with torch.no_grad():
            dropped = (torch.zeros((), device=x.device) if state.keep_TK is None
                       else (~state.keep_TK).sum() / state.keep_TK.numel())
            self.metrics = {
                "tokens_per_expert": losses.expert_counts(expert_ids_TK, self.num_experts),
                "dropped_fraction": dropped.float(),
                "router_entropy": losses.router_entropy(probs_TE.detach()),
            }
        return y_TH.view(*x.shape[:-1], y_TH.shape[-1])


def _build_base(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                router: str = "softmax_topk", renormalize: bool = True,
                capacity_factor: Optional[float] = None, deterministic: bool = False) -> nn.Module:
    if router not in ROUTERS:
        raise ValueError(f"router={router!r} is not supported; allowed routers: {', '.join(ROUTERS)}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0, or None for dropless")
    return MoELayer(hidden_size, num_experts, top_k, ffn_hidden_size, router=router,
                    renormalize=bool(renormalize), capacity_factor=capacity_factor,
                    deterministic=bool(deterministic))


# kind -> builder; the 'flex', 'time' and 'pikv' variants register here when they land.
MOE_BUILDERS: dict[str, Callable[..., nn.Module]] = {"base": _build_base}
_BASE_OPTIONS = ("router", "renormalize", "capacity_factor", "deterministic")
MOE_OPTIONS: dict[str, tuple[str, ...]] = {"base": _BASE_OPTIONS}


def create_moe(kind: str, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
               **options: Any) -> nn.Module:
    """Build a MoE layer whose forward maps [..., hidden_size] -> [..., hidden_size].

    kind 'base' options: router='softmax_topk', renormalize=True, capacity_factor=None
    (dropless), deterministic=False (ties -> lower expert index). Errors are ValueError.
    """
    if kind not in MOE_BUILDERS:
        raise ValueError(f"unknown MoE kind {kind!r}; allowed kinds: {', '.join(MOE_BUILDERS)}")
    for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts),
                        ("top_k", top_k), ("ffn_hidden_size", ffn_hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
    unknown = sorted(set(options) - set(MOE_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for MoE kind {kind!r}; "
                         f"allowed options: {', '.join(MOE_OPTIONS[kind])}")
    return MOE_BUILDERS[kind](hidden_size, num_experts, top_k, ffn_hidden_size, **options)
