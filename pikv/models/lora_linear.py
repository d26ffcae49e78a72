"""LoRA on plain linear layers (model.lora_rank > 0): y = x W^T + (alpha / rank) * dropout(x) A B.

Shapes: in I, out O, rank R; A [I, R], B [R, O] (input-major, as the LoRA experts of
pikv/moe/lora.py, whose init and merge this shares). B starts at 0, so a model with fresh adapters
computes exactly what it computed before. The base weight W keeps its name (`...q_proj.weight`) and is
frozen (no gradient, no optimizer state); only A and B train. A pretrained model's weights, a
checkpoint or the HF port therefore load into the adapted model by name, and `merge_lora` folds
B back into W for export and inference (plain nn.Linear again).

`apply_lora` replaces, in place, every nn.Linear whose module name matches one of the globs (fnmatch,
`*` crosses dots: `layers.*.self_attn.*_proj`); the KV compressor's own projections are never adapted.
A glob matching no linear layer is a ValueError naming it.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from pikv.moe.lora import add_low_rank, reset_adapter_


class LoRALinear(nn.Linear):
    """A bias-free nn.Linear plus a rank-R adapter; `weight` is the frozen base."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.weight.requires_grad_(False)
        reset_adapter_(self.lora_a, self.lora_b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        if linear.bias is not None:
            raise ValueError("LoRALinear adapts bias-free linear layers only (the pikv Transformer has no biases)")
        w = linear.weight
        if rank > min(w.shape):
            raise ValueError(f"config key 'model.lora_rank' = {rank} is invalid: must be <= min(in, out)="
                             f"{min(w.shape)} of the adapted layer (a larger rank is not low-rank)")
        out = cls(w.shape[1], w.shape[0], rank, alpha, dropout, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + (self.lora_dropout(x) @ self.lora_a) @ self.lora_b * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale * (A B)^T, [out, in] as nn.Linear stores it (differentiable)."""
        return add_low_rank(self.weight.t(), self.lora_a, self.lora_b, self.scale).t()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def lora_target_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of the nn.Linear modules `apply_lora` adapts; ValueError naming a glob that matches none."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "kv_compressor" not in n]
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in linear):
            shown = ", ".join(linear[:4]) + (", ..." if len(linear) > 4 else "")
            raise ValueError(f"config key 'model.lora_targets' = {list(patterns)!r} is invalid: {pattern!r} matches "
                             f"no nn.Linear module name (they look like {shown})")
    return [n for n in linear if any(fnmatchcase(n, p) for p in patterns)]


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> list[str]:
    """Replace the matched linear layers by LoRALinear (same base weights); returns their names. The
    adapters draw from a forked RNG: the model's other initial weights and later draws do not depend on them."""
    names = lora_target_names(model, targets)
    with torch.random.fork_rng(devices=[]):
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, LoRALinear.from_linear(getattr(parent, attr), rank, alpha, dropout))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear with the merged weight (export, inference). In place."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = getattr(parent, attr)
        plain = nn.Linear(lora.in_features, lora.out_features, bias=False, device=lora.weight.device,
                          dtype=lora.weight.dtype)
        plain.weight.copy_(lora.merged_weight())
        setattr(parent, attr, plain)
    return model
