"""Preallocated per-token buffers with in-place compaction: the memory every KV cache is made of.

Shapes: B batch, H heads of the buffer (kv heads, or 1 for a joint latent), C capacity, S stored
tokens, M kept tokens, T new tokens, F trailing feature dims (none for per-token scalars).

A `Buffers` holds named tensors [B, H, C, *F] that share one token count `n` along dim 2. Appending
writes in place; capacity grows only when a write does not fit (to `min_capacity`, else to the
next multiple of `chunk`), so a decode step never reallocates. Eviction (`keep`) gathers the kept
tokens into the front of the same buffers; `shrink` resizes once to a smaller capacity (after a
prefill larger than the budget). `nbytes()` is the bytes allocated, capacity included: what a user
of the process actually pays (docs/kv.md, "Bytes").
"""

from __future__ import annotations

from typing import Optional

import torch


class Buffers:
    def __init__(self, chunk: int = 256, min_capacity: int = 0):
        if chunk <= 0:
            raise ValueError(f"buffer chunk={chunk} must be > 0")
        self.chunk, self.min_capacity = chunk, min_capacity
        self.t: dict[str, torch.Tensor] = {}
        self.n = 0
        self.capacity = 0

    def _capacity_for(self, needed: int) -> int:
        if needed <= self.min_capacity:
            return self.min_capacity
        return -(-needed // self.chunk) * self.chunk

    def _resize(self, capacity: int, like: dict[str, torch.Tensor]) -> None:
        for name, new in like.items():
            buf = new.new_empty(*new.shape[:2], capacity, *new.shape[3:])
            old = self.t.get(name)
            if old is not None and self.n:
                buf[:, :, :self.n] = old[:, :, :self.n]
            self.t[name] = buf
        self.capacity = capacity

    def write(self, new: dict[str, torch.Tensor], at: Optional[int] = None) -> None:
        """Write T tokens of every named tensor at token index `at` (default: append after n)."""
        at = self.n if at is None else at
        T = next(iter(new.values())).shape[2]
        if at + T > self.capacity or any(name not in self.t for name in new):
            like = {**self.t, **{name: x for name, x in new.items() if name not in self.t}}
            self._resize(self._capacity_for(max(at + T, self.capacity)), like)
        for name, x in new.items():
            self.t[name][:, :, at:at + T] = x
        self.n = max(self.n, at + T)

    def __contains__(self, name: str) -> bool:
        return name in self.t

    def view(self, name: str) -> torch.Tensor:
        """The stored tokens of one tensor: [B, H, n, *F] (a view of the buffer)."""
        return self.t[name][:, :, :self.n]

    def keep(self, idx_BHM: torch.Tensor) -> None:
        """Keep tokens idx (per batch row and head, sorted) in the front of every buffer, in place."""
        M = idx_BHM.shape[2]
        for name, buf in self.t.items():
            src = buf[:, :, :self.n]
            # a keep set of H = 1 (shared by the heads) expands over a buffer's heads
            index = idx_BHM.reshape(*idx_BHM.shape, *[1] * (src.dim() - 3)).expand(*src.shape[:2], M, *src.shape[3:])
            buf[:, :, :M] = src.gather(2, index)
        self.n = M

    def move_last(self, slot_BH1: torch.Tensor, src: Optional[int] = None) -> None:
        """Evict one token per row (batch row, head): token `src` (default: the last) takes the
        evicted slot and the tokens after it move down one (a store's tail kept in order)."""
        src = self.n - 1 if src is None else src
        for buf in self.t.values():
            moved = buf[:, :, src:src + 1]
            index = slot_BH1.reshape(*slot_BH1.shape, *[1] * (buf.dim() - 3)).expand_as(moved)
            buf.scatter_(2, index, moved.clone())
            if src < self.n - 1:
                buf[:, :, src:self.n - 1] = buf[:, :, src + 1:self.n].clone()  # overlapping ranges
        self.n -= 1

    def keep_slices(self, first: int, last_from: int) -> None:
        """Keep tokens [0, first) and [last_from, n), the same in every row, with plain slices."""
        tail = self.n - last_from
        for buf in self.t.values():
            buf[:, :, first:first + tail] = buf[:, :, last_from:self.n].clone()  # overlapping ranges
        self.n = first + tail

    def shrink(self, capacity: int) -> None:
        """Reallocate to `capacity` (>= n) when the buffers are larger: frees a prefill's transient."""
        if self.capacity > capacity >= self.n:
            self._resize(capacity, dict(self.t))

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.t.values())
