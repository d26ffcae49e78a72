"""PiKV MoE: LoRA experts (`create_moe('pikv', ...)`), a parameter-efficient mixture of experts.

Shapes: E experts, H hidden, F expert FFN hidden, R LoRA rank, N dispatched rows.
Expert e's weights are base_e + (alpha / R) * A_e @ B_e for each of w1 [H, F], w3 [H, F] and
w2 [F, H] (LoRA, Hu et al. 2021). Weights are stored input-major (y = x @ W), so A maps the input
dim to R and B maps R to the output dim; B starts at 0, so a fresh adapter leaves its expert equal
to the base. The base is either one SwiGLU per expert (stacked like GroupedExperts) or a single
dense FFN shared by all experts ("mixture of LoRA experts": E adapters over one FFN).

The effective [E, ...] weights are formed once per forward (baddbmm: 2*E*H*F*R flops per weight,
small against the token matmuls' 2*N*H*F when N >> R) and run on the same grouped SwiGLU path as
plain experts, so the LoRA layer is exactly as fast per token and `merge_adapters` gives bitwise
identical outputs. A frozen base costs no optimizer state (the parameter-efficient recipe);
its weight gradient is still formed per step, on its way to A and B.

Expert parallelism: every adapter tensor is stacked [E, ...] under the module named `experts`,
so sharding, gradient reduction, DeepSpeed's MoE groups and DCP resharding treat adapters like
expert weights. A shared base lives on the layer as `base_ffn`, outside `experts`: replicated.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from pikv.config import OptionError
from pikv.moe.distill import FrozenTeacher, hidden_mse
from pikv.moe.experts import FeedForward, GroupedExperts, run_swiglu
from pikv.moe.layer import (_BASE_OPTIONS, MOE_BUILDERS, MOE_CHECKS, MOE_OPTIONS, MoELayer, _build_base,
                             _check_base, positive_int)

# (base weight, adapter A, adapter B) names; A is [E, in, R], B is [E, R, out].
_ADAPTED = (("w1_EHF", "lora_a1_EHR", "lora_b1_ERF"), ("w3_EHF", "lora_a3_EHR", "lora_b3_ERF"),
            ("w2_EFH", "lora_a2_EFR", "lora_b2_ERH"))


@torch.no_grad()
def reset_adapter_(a: torch.Tensor, b: torch.Tensor) -> None:
    """A ~ normal(0, 1/sqrt(in)) (unit-variance low-rank features of unit-variance inputs), B = 0 (the
    adapter starts as a no-op). A is [..., in, R], B [..., R, out]: the experts' and pikv/models/lora_linear.py's."""
    nn.init.normal_(a, std=1 / math.sqrt(a.shape[-2]))
    nn.init.zeros_(b)


def add_low_rank(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """w + scale * a @ b for input-major weights w [in, out] or stacked [E, in, out] (differentiable)."""
    return (torch.baddbmm if w.dim() == 3 else torch.addmm)(w, a, b, alpha=scale)


class LoRAGroupedExperts(nn.Module):
    """E SwiGLU experts whose weights are base + (alpha / rank) * A @ B, all stacked [E, ...].

    `shared_base`: a FeedForward used as every expert's base (held by reference, not registered
    here: it is replicated under expert parallelism, while everything in this module is sharded).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, rank: int, alpha: float,
                 shared_base: Optional[FeedForward] = None):
        super().__init__()
        self.num_experts, self.rank, self.alpha = num_experts, rank, alpha
        self.scale = alpha / rank
        self._shared = (shared_base,) if shared_base is not None else ()
        if shared_base is None:
            self.w1_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
            self.w3_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
            self.w2_EFH = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        dims = {"w1_EHF": (hidden_size, ffn_hidden_size), "w3_EHF": (hidden_size, ffn_hidden_size),
                "w2_EFH": (ffn_hidden_size, hidden_size)}
        for base, a, b in _ADAPTED:
            d_in, d_out = dims[base]
            setattr(self, a, nn.Parameter(torch.empty(num_experts, d_in, rank)))
            setattr(self, b, nn.Parameter(torch.empty(num_experts, rank, d_out)))
        self.use_grouped_mm: Optional[bool] = None
        self.reset_parameters()

    @property
    def shared_base(self) -> Optional[FeedForward]:
        return self._shared[0] if self._shared else None

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None, out_std: Optional[float] = None) -> None:
        """Own base: normal(0, std) / normal(0, out_std) as GroupedExperts; A ~ normal(0, 1/sqrt(in))
        (unit-variance low-rank features), B = 0 (the adapter starts as a no-op)."""
        if self.shared_base is None:
            GroupedExperts.reset_parameters(self, std, out_std)
        for _, a, b in _ADAPTED:
            reset_adapter_(getattr(self, a), getattr(self, b))

    def base_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1_EHF, w3_EHF, w2_EFH) of the base; a shared base is broadcast (a view, no copy)."""
        base = self.shared_base
        if base is None:
            return self.w1_EHF, self.w3_EHF, self.w2_EFH
        E = self.num_experts  # local experts under EP
        # nn.Linear stores [out, in]; the stacked layout is input-major.
        return (base.gate_proj.weight.t().expand(E, -1, -1), base.up_proj.weight.t().expand(E, -1, -1),
                base.down_proj.weight.t().expand(E, -1, -1))

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """base + scale * A @ B for w1, w3, w2, each [E, in, out] (differentiable)."""
        return tuple(add_low_rank(w, getattr(self, a), getattr(self, b), self.scale)
                     for w, (_, a, b) in zip(self.base_weights(), _ADAPTED))

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Same contract as GroupedExperts.forward."""
        return run_swiglu(x_NH, counts_E, *self.merged_weights(), self.use_grouped_mm)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, shared_base={bool(self._shared)}"


class LoRAMoELayer(MoELayer):
    """MoELayer with LoRA experts (see module doc). `use_distillation`: when a teacher module
    ([..., H] -> [..., H], e.g. the dense FFN the layer was upcycled from) is attached with
    `set_teacher`, each training forward sets `distill_mse` = MSE(output, teacher(input)), the
    teacher run frozen and without gradient; add it to the loss. The teacher and the loss are
    those of train.mode=distill (pikv/moe/distill.py)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, *,
                 rank: int, alpha: float, freeze_base: bool, share_base: bool, use_distillation: bool,
                 **options: Any):
        base = FeedForward(hidden_size, ffn_hidden_size) if share_base else None
        experts = LoRAGroupedExperts(num_experts, hidden_size, ffn_hidden_size, rank, alpha, base)
        super().__init__(hidden_size, num_experts, top_k, ffn_hidden_size, experts=experts, **options)
        self.base_ffn = base  # registered here, outside `experts`: replicated, not expert-parallel
        self.use_distillation = use_distillation
        self.distill_mse: Optional[torch.Tensor] = None
        self.teacher: Optional[FrozenTeacher] = None
        if freeze_base:
            self.freeze_base()

    def base_parameters(self) -> list[nn.Parameter]:
        if isinstance(self.experts, LoRAGroupedExperts):
            owner = self.base_ffn if self.base_ffn is not None else self.experts
            return [p for n, p in owner.named_parameters() if not n.startswith("lora_")]
        return []

    def freeze_base(self, frozen: bool = True) -> None:
        """Base weights out of training (no gradient, no optimizer state); adapters stay trainable."""
        for p in self.base_parameters():
            p.requires_grad_(not frozen)

    def set_teacher(self, teacher: Optional[nn.Module]) -> None:
        """Attach (or, with None, detach) the frozen teacher of `distill_mse`; not a submodule, so
        it is in no optimizer, state dict or `parameters()`."""
        if teacher is not None and not self.use_distillation:
            raise ValueError("set_teacher needs a layer built with use_distillation=True")
        self.teacher = FrozenTeacher(teacher) if teacher is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.distill_mse = None
        if self.teacher is not None and self.training:
            self.distill_mse = hidden_mse(y, self.teacher(x))
        return y


@torch.no_grad()
def merge_adapters(module: nn.Module) -> nn.Module:
    """Fold every LoRA layer's adapters into plain GroupedExperts (export, inference): the same
    weights the forward forms, so outputs are identical. In place; returns `module`."""
    layers = [module] if isinstance(module, LoRAMoELayer) else [m for m in module.modules()
                                                                 if isinstance(m, LoRAMoELayer)]
    for layer in layers:
        lora = layer.experts
        if not isinstance(lora, LoRAGroupedExperts):
            continue  # already merged
        w1, w3, w2 = (w.detach().clone() for w in lora.merged_weights())
        merged = GroupedExperts(lora.num_experts, w1.shape[1], w1.shape[2])
        for name, w in (("w1_EHF", w1), ("w3_EHF", w3), ("w2_EFH", w2)):
            getattr(merged, name).copy_(w)
        merged.use_grouped_mm = lora.use_grouped_mm
        layer.experts = merged.to(w1.device)
        layer.base_ffn = None
    return module


def _check_pikv(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, rank: int = 16,
                alpha: float = 16.0, use_distillation: bool = False, freeze_base: bool = True,
                share_base: bool = False, **base_options: Any) -> None:
    positive_int("rank", rank)
    if rank > min(hidden_size, ffn_hidden_size):
        raise OptionError("rank", rank, f"must be <= min(hidden_size, ffn_hidden_size)="
                          f"{min(hidden_size, ffn_hidden_size)} (a larger rank is not low-rank)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise OptionError("alpha", alpha, "must be a finite number > 0 (adapter scale = alpha / rank)")
    for name, value in (("use_distillation", use_distillation), ("freeze_base", freeze_base),
                        ("share_base", share_base)):
        if not isinstance(value, bool):
            raise OptionError(name, value, "must be True or False")
    _check_base(hidden_size, num_experts, top_k, ffn_hidden_size, **base_options)


def _build_pikv(hidden_size: int, num_experts: int, top_k: int, ffn_hidden_size: int, rank: int = 16,
                alpha: float = 16.0, use_distillation: bool = False, freeze_base: bool = True,
                share_base: bool = False, **base_options: Any) -> nn.Module:
    return _build_base(hidden_size, num_experts, top_k, ffn_hidden_size, **base_options, layer_cls=LoRAMoELayer,
                       rank=rank, alpha=float(alpha), freeze_base=freeze_base, share_base=share_base,
                       use_distillation=use_distillation)


MOE_BUILDERS["pikv"] = _build_pikv
MOE_CHECKS["pikv"] = _check_pikv
MOE_OPTIONS["pikv"] = ("rank", "alpha", "use_distillation", "freeze_base", "share_base") + _BASE_OPTIONS
