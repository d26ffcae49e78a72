"""Expert-parallel token dispatch: all-to-all over the EP group, behind the dispatcher interface.

Shapes: T local tokens, K experts per token, E global experts, L = E / ep local experts,
N = T*K token-slots, R rows received from the EP group, H hidden.

dispatch: sort token-slots by global expert (the local dispatcher: capacity applied locally,
          dropped slots last) -> exchange per-(rank, expert) counts -> all_to_all_single of the
          kept rows with uneven splits (no padding) -> regroup the received rows, which arrive
          as [source rank][local expert], into contiguous [local expert][source rank] segments.
combine:  the exact inverse, then the local combine with the gate weights.

Expert e lives on EP rank e // L (contiguous blocks), so the rows for one destination are already
contiguous after the sort by global expert. The split sizes must be host integers, so each
dispatch reads E counts back to the host once (as torchtitan and Megatron do); on GPUs the
exchange of layer i+1's tokens can overlap layer i's expert compute on a side stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from pikv.distributed.all_to_all import all_to_all_counts, all_to_all_v
from pikv.moe.dispatch import DispatchState, LocalDispatcher


@dataclass
class EPDispatchState:
    local: DispatchState
    regroup_R: torch.Tensor  # local-expert-major row i came from received row regroup_R[i]
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    num_rows: int  # N: rows of the local dispatch, dropped slots included

    @property
    def keep_TK(self) -> Optional[torch.Tensor]:
        return self.local.keep_TK


class AllToAllDispatcher:
    """Dispatcher for expert parallelism; this rank runs experts [ep_rank*L, (ep_rank+1)*L)."""

    def __init__(self, group: Optional[dist.ProcessGroup], ep_size: int, ep_rank: int):
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        self.local = LocalDispatcher()
        self.last_bytes_sent = 0  # rows sent by the last dispatch x hidden x itemsize (bench)

    # Both halves run eagerly under torch.compile, one graph break each by design: the split
    # sizes of the all-to-all are data-dependent host integers (each dispatch reads the counts
    # back), and so is the number of received rows. Traced instead, the graph broke at each
    # `tolist` and at the regrouping's dynamic shapes (7 breaks in a block, torch._dynamo.explain).
    @torch.compiler.disable
    def dispatch(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int,
                 capacity: Optional[int] = None, token_ids_N: Optional[torch.Tensor] = None):
        """Returns (x_RH: rows for the local experts, contiguous per expert; counts_L; state).
        token_ids_N: explicit (token, expert) pairs, as for LocalDispatcher (expert choice)."""
        x_NH, counts_E, local_state = self.local.dispatch(x_TH, expert_ids_TK, num_experts, capacity,
                                                          token_ids_N=token_ids_N)
        ep, L = self.ep_size, num_experts // self.ep_size
        recv_counts_PL = all_to_all_counts(counts_E, self.group).view(ep, L)  # [source rank, local expert]
        send_splits = counts_E.view(ep, L).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        kept = sum(send_splits)
        x_RH = all_to_all_v(x_NH[:kept], recv_splits, send_splits, self.group)
        # Received rows are ordered (source rank, local expert); experts need contiguous segments.
        expert_of_row_R = torch.repeat_interleave(
            torch.arange(L, device=x_RH.device).repeat(ep), recv_counts_PL.flatten())
        regroup_R = torch.argsort(expert_of_row_R, stable=True)
        self.last_bytes_sent = kept * x_TH.shape[-1] * x_TH.element_size()
        state = EPDispatchState(local_state, regroup_R, send_splits, recv_splits, x_NH.shape[0])
        return x_RH.index_select(0, regroup_R), recv_counts_PL.sum(0), state

    @torch.compiler.disable
    def combine(self, y_RH: torch.Tensor, weights_TK: torch.Tensor, state: EPDispatchState) -> torch.Tensor:
        """Send expert outputs back to the tokens' ranks and combine them with the gate weights."""
        y_recv_RH = torch.empty_like(y_RH).index_copy(0, state.regroup_R, y_RH)
        y_kept_NH = all_to_all_v(y_recv_RH, state.send_splits, state.recv_splits, self.group)
        dropped = state.num_rows - y_kept_NH.shape[0]
        y_NH = torch.cat([y_kept_NH, y_kept_NH.new_zeros(dropped, y_kept_NH.shape[1])]) if dropped else y_kept_NH
        return self.local.combine(y_NH, weights_TK, state.local)
