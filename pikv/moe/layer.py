"""The MoE layer (router -> dispatcher -> grouped experts -> combine) and `create_moe`.

Shapes: T tokens, H hidden, E experts, K experts per token, N = T*K dispatched rows.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from pikv.config import OptionError
from pikv.moe import losses
from pikv.moe.dispatch import LocalDispatcher
from pikv.moe.experts import FeedForward, GroupedExperts
from pikv.moe.router import build_router, check_router


class MoELayer(nn.Module):
    """Sparse MoE (router, see pikv.moe.router) plus optional shared experts; defaults are
    exactly Mixtral's sparse MoE block.

    After each forward: `aux_loss` (load balancing), `z_loss` (scalar tensors with grad) and
    `metrics` (detached tensors: tokens_per_expert [E], dropped_fraction, router_entropy).
    Nothing is .item()-ed here: that would sync the GPU every layer.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 router: str = "softmax_topk", renormalize: bool = True,
                 capacity_factor: Optional[float] = None, deterministic: bool = False,
                 num_shared_experts: int = 0, shared_ffn_hidden_size: Optional[int] = None,
                 experts: Optional[nn.Module] = None, **router_options: Any):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.router = build_router(router, hidden_size, num_experts, top_k, renormalize=renormalize,
                                   deterministic=deterministic, capacity_factor=capacity_factor,
                                   **router_options)
        self.dispatcher = LocalDispatcher()  # replaced by an all-to-all dispatcher under EP
        # `experts`: another stacked-expert module with the same forward (LoRA experts, pikv.moe.lora).
        self.experts = experts if experts is not None else GroupedExperts(num_experts, hidden_size, ffn_hidden_size)
        shared_width = num_shared_experts * (shared_ffn_hidden_size or ffn_hidden_size)
        # DeepSeekMoE shared experts: one dense SwiGLU every token goes through. Not named
        # `experts`: the gradient reducer treats parameters under a module named `experts` as
        # expert-parallel, and these are replicated like any dense weight.
        self.shared_experts = FeedForward(hidden_size, shared_width) if num_shared_experts > 0 else None
        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.metrics: dict[str, torch.Tensor] = {}
        # Set by pikv.models.parallelize under data/expert parallelism: the aux loss then uses
        # the routing statistics of every rank (see losses.load_balancing_loss).
        self.stats_group: Optional[dist.ProcessGroup] = None

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert: ceil(capacity_factor * T * K / E) (GShard), None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        x_TH = x.reshape(-1, self.hidden_size)
        if getattr(self.router, "expert_choice", False):  # a fake router in a test may lack it
            return self._forward_expert_choice(x, x_TH)
        weights_TK, expert_ids_TK, logits_TE, probs_TE = self.router(x_TH)
        x_NH, counts_E, state = self.dispatcher.dispatch(
            x_TH, expert_ids_TK, self.num_experts, self.capacity(x_TH.shape[0]))
        y_NH = self.experts(x_NH, counts_E)
        y_TH = self.dispatcher.combine(y_NH, weights_TK, state)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)

        f_E = (None if self.stats_group is None
               else losses.global_slot_fraction(expert_ids_TK, self.num_experts, self.stats_group))
        self.aux_loss = losses.load_balancing_loss(probs_TE, expert_ids_TK, f_E)
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

    def _forward_expert_choice(self, x: torch.Tensor, x_TH: torch.Tensor) -> torch.Tensor:
        """Expert choice: the router's E x C (expert, token) pairs go through the dispatcher's
        explicit-assignment form (token_ids_N); a token picked by no expert gets 0 (residual)."""
        weights_EC, token_ids_EC, logits_TE, probs_TE = self.router(x_TH)
        E, C = token_ids_EC.shape
        token_ids_N = token_ids_EC.reshape(-1)
        expert_ids_N1 = torch.arange(E, device=x.device).repeat_interleave(C).unsqueeze(1)
        x_NH, counts_E, state = self.dispatcher.dispatch(x_TH, expert_ids_N1, E, None,
                                                         token_ids_N=token_ids_N)
        y_NH = self.experts(x_NH, counts_E)
        y_TH = self.dispatcher.combine(y_NH, weights_EC.reshape(-1, 1), state)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        # Every expert takes exactly C tokens, so the Switch loss is 1 (balanced) with no
        # gradient: kept for uniform logging, harmless in the total loss.
        self.aux_loss = losses.load_balancing_loss(probs_TE, expert_ids_N1)
        self.z_loss = losses.z_loss(logits_TE)
        with torch.no_grad():
            picked_T = torch.zeros(x_TH.shape[0], dtype=torch.bool, device=x.device)
            picked_T.index_fill_(0, token_ids_N, True)
            self.metrics = {
                "tokens_per_expert": losses.expert_counts(expert_ids_N1, E),
                "dropped_fraction": (~picked_T).float().mean(),  # tokens no expert picked
                "router_entropy": losses.router_entropy(probs_TE.detach()),
            }
        return y_TH.view(*x.shape[:-1], y_TH.shape[-1])


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OptionError(name, value, "must be a positive integer")


def _check_base(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                router: str = "softmax_topk", renormalize: bool = True,
                capacity_factor: Optional[float] = None, deterministic: bool = False,
                num_shared_experts: int = 0, shared_ffn_hidden_size: Optional[int] = None,
                route_scale: float = 1.0, sinkhorn_iterations: int = 30) -> None:
    """The base options' rules (every kind builds on them)."""
    check_router(router, route_scale=route_scale, sinkhorn_iterations=sinkhorn_iterations)
    if capacity_factor is not None and not capacity_factor > 0:
        raise OptionError("capacity_factor", capacity_factor, "must be > 0, or None for dropless")
    if (isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int)
            or num_shared_experts < 0):
        raise OptionError("num_shared_experts", num_shared_experts, "must be an integer >= 0")
    if shared_ffn_hidden_size is not None:
        if isinstance(shared_ffn_hidden_size, bool) or not isinstance(shared_ffn_hidden_size, int) \
                or shared_ffn_hidden_size <= 0:
            raise OptionError("shared_ffn_hidden_size", shared_ffn_hidden_size,
                              "must be a positive integer, or None for ffn_hidden_size")


def _build_base(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int,
                router: str = "softmax_topk", renormalize: bool = True,
                capacity_factor: Optional[float] = None, deterministic: bool = False,
                num_shared_experts: int = 0, shared_ffn_hidden_size: Optional[int] = None,
                route_scale: float = 1.0, sinkhorn_iterations: int = 30, *,
                layer_cls: type = MoELayer, **layer_options: Any) -> nn.Module:
    """Build `layer_cls` from checked options (variants such as pikv.moe.lora pass their MoELayer
    subclass and its own options)."""
    return layer_cls(hidden_size, num_experts, top_k, ffn_hidden_size, router=router,
                     renormalize=bool(renormalize), capacity_factor=capacity_factor,
                     deterministic=bool(deterministic), num_shared_experts=num_shared_experts,
                     shared_ffn_hidden_size=shared_ffn_hidden_size, route_scale=route_scale,
                     sinkhorn_iterations=sinkhorn_iterations, **layer_options)


# kind -> builder, the rules of its options (raise OptionError), its option names. Variants
# register themselves on import: 'pikv' (pikv/moe/lora.py), 'flex' and 'time' (pikv/moe/variants/).
MOE_BUILDERS: dict[str, Callable[..., nn.Module]] = {"base": _build_base}
MOE_CHECKS: dict[str, Callable[..., None]] = {"base": _check_base}
_BASE_OPTIONS = ("router", "renormalize", "capacity_factor", "deterministic", "num_shared_experts",
                 "shared_ffn_hidden_size", "route_scale", "sinkhorn_iterations")
MOE_OPTIONS: dict[str, tuple[str, ...]] = {"base": _BASE_OPTIONS}


def _ffn_width(hidden_size: int, ffn_hidden_size: Optional[int]) -> int:
    return 4 * hidden_size if ffn_hidden_size is None else ffn_hidden_size


def check_moe(kind: str, hidden_size: int, num_experts: int, top_k: int,
              ffn_hidden_size: Optional[int] = None, **options: Any) -> None:
    """Every rule `create_moe` applies to these arguments, without building anything: ValueError
    for an unknown kind or option, OptionError (a ValueError naming the argument) for a bad value."""
    if kind not in MOE_BUILDERS:
        raise ValueError(f"unknown MoE kind {kind!r}; allowed kinds: {', '.join(MOE_BUILDERS)}")
    ffn_hidden_size = _ffn_width(hidden_size, ffn_hidden_size)
    for name, value in (("hidden_size", hidden_size), ("num_experts", num_experts),
                        ("top_k", top_k), ("ffn_hidden_size", ffn_hidden_size)):
        positive_int(name, value)
    if top_k > num_experts:
        raise OptionError("top_k", top_k, "must be <= {num_experts}", num_experts=num_experts)
    unknown = sorted(set(options) - set(MOE_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for MoE kind {kind!r}; "
                         f"allowed options: {', '.join(MOE_OPTIONS[kind])}")
    MOE_CHECKS[kind](hidden_size, num_experts, top_k, ffn_hidden_size, **options)


def create_moe(kind: str, hidden_size: int, num_experts: int, top_k: int,
               ffn_hidden_size: Optional[int] = None, **options: Any) -> nn.Module:
    """Build a MoE layer whose forward maps [..., hidden_size] -> [..., hidden_size].

    ffn_hidden_size defaults to 4 * hidden_size (the original PiKV's `create_moe(kind,
    hidden_size, num_experts, top_k, ...)` has no such argument).

    kind 'base' options: router='softmax_topk' (one of pikv.moe.router.ROUTERS),
    renormalize=True, capacity_factor=None (dropless; expert_choice: 1.0),
    deterministic=False (no router noise, ties -> lower expert / token index),
    num_shared_experts=0 and shared_ffn_hidden_size=None (= ffn_hidden_size): DeepSeekMoE
    shared experts, route_scale=1.0 (gate weights x route_scale), sinkhorn_iterations=30.
    kind 'pikv' (pikv.moe.lora, LoRA experts): the base options plus rank=16, alpha=16.0
    (adapter scale alpha / rank), freeze_base=True, share_base=False (True: one dense FFN is
    every expert's base), use_distillation=False (True: `set_teacher` + `distill_mse`).
    kind 'flex' (pikv.moe.variants.flex, Flex-MoE): forward(x, combo) with each token's
    modality-combination index; options num_modalities=3, specialized_routing=True (needs
    num_experts >= 2^num_modalities - 1) and the base options (softmax_topk router, dropless).
    kind 'time' (pikv.moe.variants.time, Time-MoE): the base options, with renormalize=False and
    num_shared_experts=1 (a sigmoid-gated shared expert) by default.
    Errors are ValueError (see `check_moe`, which applies the same rules without building).
    """
    check_moe(kind, hidden_size, num_experts, top_k, ffn_hidden_size, **options)
    return MOE_BUILDERS[kind](hidden_size, num_experts, top_k, _ffn_width(hidden_size, ffn_hidden_size), **options)
