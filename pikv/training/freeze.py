"""train.freeze: parameters kept at their initial values (no gradient, no optimizer state), chosen by
glob patterns on parameter names (fnmatch: `*` also crosses dots, `layers.*.mlp.*`).

Applied to the whole model before the engine is built, so both engines (their optimizers and the
gradient reduction take only parameters that require grad) leave the frozen ones alone, on every rank
alike. A tied LM head is the embedding's tensor and is listed (and frozen) under `embed_tokens.weight`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def freeze_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter whose name matches one of `patterns`; returns the
    frozen names. ValueError naming train.freeze when a pattern matches no parameter (a typo would
    otherwise train everything silently)."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"config key 'train.freeze' = {list(patterns)!r} is invalid: {pattern!r} matches no "
                             f"parameter name (names look like {shown})")
    frozen = []
    for name, param in model.named_parameters():
        if any(fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
