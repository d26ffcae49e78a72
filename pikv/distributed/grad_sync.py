"""Gradient averaging for data x expert parallelism.

Every rank's loss is the mean over its own tokens, and the global loss is the mean of the ranks'
losses, so the true gradient is (1 / world_size) * sum over ranks. For dense parameters that sum
runs over all ranks. An expert's gradient on its owner already sums the contributions of every
rank in the expert-parallel group (tokens arrive through the all-to-all and the backward pass
returns their gradients), so its sum runs only over the expert-data-parallel group — and is still
divided by world_size, not by that group's size (dividing by the group size is the classic EP
scaling bug).

Why not DDP: DDP averages every parameter over one group; expert parameters need another group.
Gradients are reduced after backward in flat buckets (few large collectives instead of one per
tensor); overlapping the reduction with backward through post-accumulate-grad hooks is the known
next step for GPUs.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 32 * 1024 * 1024


def is_expert_param(name: str) -> bool:
    """Expert weights live in modules named `experts` (GroupedExperts, stacked [E, ...])."""
    return ".experts." in f".{name}"


class GradientReducer:
    def __init__(self, model: nn.Module, world_size: int, expert_dp_group: Optional[dist.ProcessGroup],
                 ep_group: Optional[dist.ProcessGroup] = None, is_expert: Callable[[str], bool] = is_expert_param):
        self.world_size = world_size
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.dense = [p for n, p in named if not is_expert(n)]
        self.expert = [p for n, p in named if is_expert(n)]
        self.expert_dp_group = expert_dp_group
        self.ep_group = ep_group

    def _reduce(self, params: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            # A parameter no token reached (an idle expert) still joins the collective, as zeros:
            # ranks must issue identical collectives or they deadlock.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if bucket and (p.grad.dtype != bucket[0].dtype or size + p.grad.nbytes > BUCKET_BYTES):
                self._flush(bucket, group)
                bucket, size = [], 0
            bucket.append(p.grad)
            size += p.grad.nbytes
        if bucket:
            self._flush(bucket, group)

    def _flush(self, grads: list[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat.div_(self.world_size)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def reduce(self) -> None:
        if self.world_size == 1:
            return
        self._reduce(self.dense, None)
        self._reduce(self.expert, self.expert_dp_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the *global* gradient; call after `reduce`. Returns that norm.

        After reduction dense gradients are identical on every rank, but each EP rank holds a
        different slice of the experts: their squared norms are summed over the EP group, or
        every rank would clip with a different (too small) norm and the replicas would diverge.
        """
        grads = [p.grad for p in self.dense + self.expert if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        dense_sq = sum((g.float().square().sum() for g in (p.grad for p in self.dense if p.grad is not None)),
                       torch.zeros((), device=device))
        expert_sq = sum((g.float().square().sum() for g in (p.grad for p in self.expert if p.grad is not None)),
                        torch.zeros((), device=device))
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(expert_sq, group=self.ep_group)
        total = (dense_sq + expert_sq).sqrt()
        if max_norm > 0:
            torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
        return total
