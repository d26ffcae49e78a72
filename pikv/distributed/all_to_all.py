"""Differentiable uneven all-to-all (the expert-parallel token exchange).

Forward sends `input_splits[r]` rows to rank r and receives `output_splits[r]` rows from it;
backward is the same exchange with the splits swapped, so gradients flow back to the rank
that owns each token. No padding: the bytes on the wire are exactly the routed rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NH: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x_NH.new_empty((sum(output_splits), *x_NH.shape[1:]))
        dist.all_to_all_single(out, x_NH.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_v(x_NH: torch.Tensor, output_splits: list[int], input_splits: list[int],
                 group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Uneven all-to-all of rows with autograd. Splits are per rank of `group`, in rows."""
    return _AllToAllV.apply(x_NH, output_splits, input_splits, group)


def all_to_all_counts(counts: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Exchange equal-sized blocks of a count tensor (no autograd): block r goes to rank r."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
