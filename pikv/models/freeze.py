"""train.freeze: parameters kept at their initial values (no gradient, no optimizer state), chosen by
glob patterns on parameter names (fnmatch: `*` also crosses dots, `layers.*.mlp.*`).

The trainer applies it to the whole model before the engine is built, so both engines (their
optimizers and the gradient reduction take only parameters that require grad) leave the frozen ones
alone, on every rank alike; the LM task checks the patterns before any work against the parameter
names of a model built on the meta device. A tied LM head is the embedding's tensor and is listed
(and frozen) under `embed_tokens.weight`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def check_freeze(names: list[str], patterns: list[str]) -> None:
    """ValueError naming train.freeze when a pattern matches none of the parameter `names` (a typo
    would otherwise train everything silently)."""
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"config key 'train.freeze' = {list(patterns)!r} is invalid: {pattern!r} matches no "
                             f"parameter name (names look like {shown})")


def freeze_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter whose name matches one of `patterns` (checked by
    `check_freeze`); returns the frozen names."""
    check_freeze([n for n, _ in model.named_parameters()], patterns)
    frozen = []
    for name, param in model.named_parameters():
        if any(fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
