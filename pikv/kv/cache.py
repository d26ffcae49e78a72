"""The KV cache: a storage format x a selection rule, per layer, with exact byte accounting.

Shapes: B batch, N query heads, G kv heads, H keep-set heads (G, or 1 for a joint latent), T new
tokens, S stored tokens, K keys read, M kept tokens, D head dim.

Keys are stored after RoPE (their positions baked in), so evicting never re-rotates; low-rank
stores keep pre-RoPE codes and rotate the decoded keys at their stored positions.

`KVCache.attend` is the one cache path of `pikv.models.transformer.Attention`: append the new
tokens to the store, attend over what it reads (under the selection's read mask: Quest), fold
the attention probabilities into the selection's scores, let the store settle (KIVI quantizes the
groups leaving its residual, the latent encodes the tokens leaving its exact window), evict down
to the budget. Between steps every layer holds at most its budget of tokens; within a step the new
tokens attend to themselves before anything is evicted (a prefill attends to the whole prompt before
it is compressed, as SnapKV and kvpress do). The plain cache is `KVCache(num_layers)`: exact
storage in the model's dtype x keep everything.

A decode step evicts one token per row (budget M + 1 -> M): the newest token (for the latent, the
one that just left its exact window) is moved into the evicted token's slot (attention does not
depend on the order of the slots; recency is read from the stored positions), so a step moves one
token per row instead of re-gathering the budget. A multi-token step
(a prefill) compacts the kept tokens in place.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch

from pikv.kv.budgets import KVOptions
from pikv.kv.buffers import Buffers
from pikv.kv.selection import Selection
from pikv.kv.storage import Store


class KVCache:
    """A per-layer KV cache. Build one for a method and budget with `pikv.kv.make_cache`; use it
    with `model(tokens, cache)` or `model.generate(..., cache=cache)`.

    nbytes(): the bytes allocated by every tensor the cache holds (keys/values/codes, positions,
    scores, quantization scales and zero points, Quest page bounds), capacity included.
    peak_nbytes: the largest nbytes() between forward calls. seq_len: tokens appended (the next
    token's position); length(layer): tokens stored."""

    def __init__(self, num_layers: int, chunk_size: int = 256, *, name: str = "full",
                 store: Optional[Callable[[int], Store]] = None, selection: Optional[Selection] = None,
                 budgets: Optional[list[int]] = None, options: Optional[KVOptions] = None,
                 capacity: Union[int, list[int]] = 0, store_dtype: Optional[torch.dtype] = None):
        if num_layers <= 0 or chunk_size <= 0:
            raise ValueError(f"num_layers={num_layers} and chunk_size={chunk_size} must be > 0")
        self.num_layers, self.chunk_size, self.name = num_layers, chunk_size, name
        self.opt = options or KVOptions()
        self.selection = selection or Selection(self.opt)
        self.budgets = budgets
        self.store_dtype = store_dtype
        # tokens each layer's buffers are allocated for (0: grown in chunks of chunk_size)
        self._capacity = capacity if isinstance(capacity, list) else [capacity] * num_layers
        self._store_factory = store or (lambda li: Store(store_dtype, chunk_size, self._capacity[li]))
        self.reset()

    def reset(self) -> None:
        """Drop every stored token and free the buffers."""
        L = self.num_layers
        self.selection = type(self.selection)(self.opt)  # fresh per-layer state (Quest's)
        self.stores = [self._store_factory(li) for li in range(L)]
        self.meta = [Buffers(self.chunk_size, self._capacity[li]) for li in range(L)]  # the selection's per-token metadata
        page = self.opt.quest_page
        self.pages = [Buffers(max(1, self.chunk_size // page), -(-self._capacity[li] // page))  # Quest bounds
                      for li in range(L)]
        self._evicted = [False] * L  # positions no longer 0..S-1
        self._seen = [0] * L
        self._layer_bytes = [0] * L
        self.peak_nbytes = 0
        self.decode_steps = 0
        self.bytes_read = 0  # Quest: bytes of K/V read by decode steps (memory is not freed)
        self.prefill_len = 0

    @property
    def seq_len(self) -> int:
        """Tokens appended so far; the next token's position."""
        return self._seen[0]

    def length(self, layer_idx: int) -> int:
        return self.stores[layer_idx].length()

    def get(self, layer_idx: int):
        """Stored (k_BGSD, v_BGSD) of one layer (views; exact storage)."""
        return self.stores[layer_idx].get()

    def positions(self, layer_idx: int) -> torch.Tensor:
        """Positions of the stored tokens [B, H, S] (an evicting selection's metadata)."""
        return self.meta[layer_idx].view("pos")

    def _layer_nbytes(self, li: int) -> int:
        return self.stores[li].nbytes() + self.meta[li].nbytes() + self.pages[li].nbytes()

    def nbytes(self) -> int:
        """Bytes allocated by every tensor this cache holds (metadata and capacity included)."""
        return sum(self._layer_nbytes(li) for li in range(self.num_layers))

    def attend(self, layer_idx: int, q_BNTD, k_BGTD, v_BGTD, *, k_pre_BGTD=None, rope=None,
               start: int = 0) -> torch.Tensor:
        """Append T new tokens (keys after RoPE; pre-RoPE keys for low-rank stores), attend, evict.
        Returns the attention output [B, N, T, D]."""
        li, T = layer_idx, k_BGTD.shape[2]
        self._count_step(li, start, T)
        store, sel = self.stores[li], self.selection
        store.append(k_BGTD if k_pre_BGTD is None else k_pre_BGTD, k_BGTD, v_BGTD)
        B, G = k_BGTD.shape[:2]
        new_meta = sel.new_meta(self, B, 1 if store.joint_heads else G, T, start, k_BGTD.device)
        if new_meta:
            self.meta[li].write(new_meta)
        if self.opt.prefill_only and start > 0 and sel.evicts:
            self.budgets[li] += T
        o_BNTD = self._attend(li, q_BNTD, start, T, rope)
        store.settle()
        if sel.evicts:
            self._evict(li, start, T)
        self._account(li, T)
        return o_BNTD

    # The bookkeeping of a step, shared with pikv/kv/sharded.py's cache (which stores a share).
    def _count_step(self, li: int, start: int, T: int) -> None:
        if li == 0:
            if start == 0:
                self.prefill_len = T
            elif T == 1:
                self.decode_steps += 1

    def _account(self, li: int, T: int) -> None:
        self._seen[li] += T
        self._layer_bytes[li] = self._layer_nbytes(li)
        self.peak_nbytes = max(self.peak_nbytes, sum(self._layer_bytes))

    def _attend(self, li: int, q_BNTD, start: int, T: int, rope):
        store, sel = self.stores[li], self.selection
        pos = self.positions(li) if self._evicted[li] else 0
        read = functools.cache(lambda: store.read(q_BNTD.dtype, rope, pos, start, T))
        S = store.tokens_read()
        # the selection's extra read rule (Quest) sees the keys only if it needs them
        extra = sel.read_mask(self, li, q_BNTD, lambda: read()[0][:, :, :S], start)
        o_BNTD, p_BNTS = store.attend(q_BNTD, read, pos, start, T, extra, sel.needs_probs)
        if p_BNTS is not None:
            sel.update(self, li, p_BNTS, start)
        return o_BNTD

    def _evict(self, li: int, start: int, T: int) -> None:
        """Keep the top M tokens of each row by the selection's score; its sinks and recent tokens
        (and the store's exact tail) by position. A decode step evicts one token per row: the new
        token moves into its slot (attention does not depend on the order of the slots)."""
        store, meta, sel = self.stores[li], self.meta[li], self.selection
        S, M = store.length(), self.budgets[li]
        if S <= M:
            return
        sinks, recent = sel.protect(self, li)
        recent = max(recent, store.tail)
        self._evicted[li] = True
        pos_BHS = self.positions(li)
        protected_BHS = (pos_BHS < sinks) | (pos_BHS > start + T - 1 - recent)
        score_BHS = sel.scores(self, li).masked_fill(protected_BHS, float("inf"))
        if T == 1 and S == M + 1 and store.free_order:
            victim_BH1 = score_BHS.argmin(dim=-1, keepdim=True)
            meta.move_last(victim_BH1, store.move_last(victim_BH1))
            return
        keep_BHM = score_BHS.topk(M, dim=-1).indices.sort(dim=-1).values
        store.keep(keep_BHM)
        meta.keep(keep_BHM)
        if T > 1:  # a decode step holds M + 1 tokens at most: free a prefill's transient
            store.shrink(M + 1)
            meta.shrink(M + 1)
