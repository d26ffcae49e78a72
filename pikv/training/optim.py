"""AdamW with decoupled weight decay on matrices only (norm gains are not decayed, as in GPT-2/Llama):
the parameter groups, optimizer and learning-rate setting of both engines (torch, deepspeed)."""

from typing import Callable, Optional

import torch
from torch import nn

from pikv.config import TrainConfig


def param_groups(model: nn.Module) -> list[dict]:
    """The trainable parameters in two named groups, "decay" (>= 2-D) and "no_decay"; the weight
    decay is set by `build_optimizer`. Named: DeepSpeed splits groups by name into MoE groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"name": "decay", "params": [p for p in params if p.dim() >= 2]},
            {"name": "no_decay", "params": [p for p in params if p.dim() < 2]}]


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    split: Optional[Callable[[list[dict]], list[dict]]] = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; `split` regroups them first (DeepSpeed's expert groups).
    Empty groups are dropped."""
    decay = {"decay": cfg.weight_decay, "no_decay": 0.0}
    groups = [{**g, "weight_decay": decay[g["name"]]} for g in param_groups(model)]
    if split is not None:
        groups = split(groups)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of the coming step in every group (the schedule is pikv.training.schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
