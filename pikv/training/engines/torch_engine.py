"""The default engine: PiKV's own gradient reducer (dense over the world, experts over the
expert-data-parallel group), global-norm clipping and torch AdamW."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pikv.config import JobConfig
from pikv.distributed import DistContext, GradientReducer
from pikv.training.optim import build_optimizer, set_lr


class TorchEngine:
    name = "torch"

    def __init__(self, model: nn.Module, cfg: JobConfig, ctx: DistContext):
        self.model = self.forward = model
        self.optimizer = build_optimizer(model, cfg.train)
        self.reducer = GradientReducer(model, ctx.world_size, ctx.expert_dp_group, ctx.ep_group)
        self.grad_clip = cfg.train.grad_clip

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        self.reducer.reduce()
        grad_norm = self.reducer.clip_grad_norm_(self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def dcp_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self.optimizer

    def save_extra(self, tmp_dir: Path, rank: int) -> None:
        pass

    def load_extra(self, path: Path, rank: int, saved_world: int, saved_ep: int) -> None:
        pass
