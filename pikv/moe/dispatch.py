"""Token dispatch: permute token-slots into contiguous per-expert segments, and back.

Shapes: T tokens, H hidden, K experts per token, E experts, N = T*K dispatched rows.
Kept separate from the experts (torchtitan's token dispatchers) so an all-to-all dispatcher
for expert parallelism can replace `LocalDispatcher` behind the same two calls.
All shapes are static (N rows always), so nothing here reads a count back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pikv.moe.losses import expert_counts


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`."""

    perm_N: torch.Tensor  # sorted row i holds flat token-slot perm_N[i] (= t * K + k)
    keep_TK: Optional[torch.Tensor]  # False where capacity dropped the slot; None = dropless
    num_tokens: int
    top_k: int
    # Explicit-assignment form (expert choice): the dispatched "slots" are N (token, expert)
    # pairs, pair i belongs to token token_ids_N[i]; combine sums each pair into its token.
    token_ids_N: Optional[torch.Tensor] = None
    num_out_tokens: int = 0


class LocalDispatcher:
    """Single-process dispatcher: a stable sort of the T*K token-slots by expert id."""

    def dispatch(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, num_experts: int,
                 capacity: Optional[int] = None, token_ids_N: Optional[torch.Tensor] = None):
        """Returns (x_NH, counts_E, state).

        x_NH: x permuted so expert e's rows are contiguous, in token order, experts ascending;
        counts_E: rows each expert must process (int64). With a capacity, each expert keeps its
        first `capacity` slots in token order; dropped slots go after all kept rows (still N rows,
        so shapes stay static) and counts_E excludes them.

        token_ids_N (optional): explicit assignment, e.g. expert choice where a token gets 0..E
        experts. expert_ids_TK is then [N, 1]: pair i sends token token_ids_N[i] to expert
        expert_ids_TK[i, 0]; everything above holds with the N pairs as the "tokens", and
        `combine` returns [T, H] (T = x_TH.shape[0]) with each pair summed into its token.
        """
        if token_ids_N is not None:
            assert expert_ids_TK.shape == (token_ids_N.numel(), 1), "pairs: expert_ids must be [N, 1]"
            x_out_TH, x_TH = x_TH, x_TH.index_select(0, token_ids_N)
        T, K = expert_ids_TK.shape
        flat_N = expert_ids_TK.reshape(-1)
        keep_TK = None
        if capacity is not None:
            # Position of each slot within its expert's queue, in token order.
            order_N = torch.argsort(flat_N, stable=True)
            counts_E = expert_counts(expert_ids_TK, num_experts)
            starts_E = counts_E.cumsum(0) - counts_E
            pos_N = torch.empty_like(flat_N)
            pos_N[order_N] = torch.arange(flat_N.numel(), device=flat_N.device) - starts_E[flat_N[order_N]]
            keep_N = pos_N < capacity
            keep_TK = keep_N.view(T, K)
            # Dropped slots get key E: stably sorted after every kept row.
            flat_N = torch.where(keep_N, flat_N, num_experts)
        perm_N = torch.argsort(flat_N, stable=True)
        counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat_N.device)
        counts_E = counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))[:num_experts]
        x_NH = x_TH.index_select(0, perm_N // K)
        state = DispatchState(perm_N, keep_TK, T, K)
        if token_ids_N is not None:
            state.token_ids_N, state.num_out_tokens = token_ids_N, x_out_TH.shape[0]
        return x_NH, counts_E, state

    def combine(self, y_NH: torch.Tensor, weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Un-permute expert outputs and sum each token's K outputs with its gate weights -> y_TH.

        A scatter (index_copy: every target row written once) then a sum over K, rather than
        index_add over tokens: no atomics, so the result is bitwise reproducible on GPU too.
        """
        T, K, H = state.num_tokens, state.top_k, y_NH.shape[-1]
        w_TK = weights_TK.to(y_NH.dtype)  # Mixtral casts routing weights to the hidden dtype
        if state.keep_TK is not None:
            w_TK = w_TK * state.keep_TK  # a dropped slot contributes nothing; the residual carries it
        y_flat_NH = y_NH.new_zeros(T * K, H).index_copy(0, state.perm_N, y_NH)
        y_TH = (y_flat_NH.view(T, K, H) * w_TK.unsqueeze(-1)).sum(dim=1)
        if state.token_ids_N is not None:
            # Pairs -> tokens: a token has a variable number of pairs, so this is an index_add
            # (atomics on GPU; deterministic under torch.use_deterministic_algorithms(True)).
            y_TH = y_TH.new_zeros(state.num_out_tokens, H).index_add(0, state.token_ids_N, y_TH)
        return y_TH
