"""AdamW with decoupled weight decay on matrices only (norm gains are not decayed, as in GPT-2/Llama):
the parameter groups, optimizer and learning-rate setting of both engines (torch, deepspeed).

train.param_groups gives some parameters their own learning rate (a retrofit's KV compressor below
its LoRA adapters): each group stores `lr_scale` = its lr / train.lr and `set_lr` sets
schedule(step) * lr_scale, so every group follows the same warmup/cosine shape."""

from fnmatch import fnmatchcase
from typing import Callable, Optional

import torch
from torch import nn

from pikv.config import LRGroup, TrainConfig


def lr_group_index(name: str, lr_groups: list[LRGroup]) -> Optional[int]:
    """The first train.param_groups entry whose glob matches `name` (None: train.lr)."""
    return next((i for i, g in enumerate(lr_groups) if fnmatchcase(name, g.params)), None)


def param_groups(model: nn.Module, lr_groups: Optional[list[LRGroup]] = None, base_lr: float = 1.0) -> list[dict]:
    """The trainable parameters in named groups "decay" (>= 2-D) and "no_decay", each split further by
    `lr_groups` ("decay.lr0", ...: entry 0's parameters) with `lr_scale` = lr / base_lr; the weight
    decay is set by `build_optimizer`. Named: DeepSpeed splits groups by name into MoE groups.
    ValueError naming a glob that matches no trainable parameter."""
    lr_groups = list(lr_groups or [])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    slot = {n: lr_group_index(n, lr_groups) for n, _ in named}
    for i, g in enumerate(lr_groups):
        if i not in slot.values():
            raise ValueError(f"config key 'train.param_groups[{i}].params' = {g.params!r} is invalid: it matches no "
                             "trainable parameter (an earlier glob may take them; names look like "
                             f"{', '.join(n for n, _ in named[:4])}, ...)")
    groups = []
    for kind, keep in (("decay", lambda p: p.dim() >= 2), ("no_decay", lambda p: p.dim() < 2)):
        for i in [None] + list(range(len(lr_groups))):
            groups.append({"name": kind if i is None else f"{kind}.lr{i}",
                           "params": [p for n, p in named if keep(p) and slot[n] == i],
                           "lr_scale": 1.0 if i is None else lr_groups[i].lr / base_lr})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    split: Optional[Callable[[list[dict]], list[dict]]] = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, cfg.param_groups)`; `split` regroups them first (DeepSpeed's
    expert groups). Empty groups are dropped."""
    decay = {"decay": cfg.weight_decay, "no_decay": 0.0}
    groups = [{**g, "weight_decay": decay[g["name"].split(".")[0]]}
              for g in param_groups(model, cfg.param_groups, cfg.lr)]
    if split is not None:
        groups = split(groups)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of the coming step: `lr` (the schedule, pikv.training.schedule) times each
    group's lr_scale (train.param_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
