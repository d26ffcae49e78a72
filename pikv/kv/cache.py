"""Per-layer key/value cache for incremental decoding.

Shapes: B batch, G kv heads, S stored tokens, T new tokens, D head dim.
Keys are stored AFTER RoPE: each key carries its absolute position, so an eviction/compression
policy may drop or merge stored tokens without re-rotating the survivors.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Storage: per layer, a preallocated buffer [B, G, capacity, D] that grows in chunks of
    `chunk_size` tokens (amortises the copies of concatenating every step). `nbytes()` reports
    the buffers' real storage, i.e. capacity, not just the filled part; chunk_size=1 makes the
    two equal. This plain cache holds no metadata tensors, so nbytes is keys + values.

    `seq_len` counts tokens appended (the position of the next token); `length(layer)` counts
    tokens stored, which differs once a policy evicts.
    """

    def __init__(self, num_layers: int, chunk_size: int = 256):
        if num_layers <= 0 or chunk_size <= 0:
            raise ValueError(f"num_layers={num_layers} and chunk_size={chunk_size} must be > 0")
        self.num_layers = num_layers
        self.chunk_size = chunk_size
        self._k: list[Optional[torch.Tensor]] = [None] * num_layers  # [B, G, capacity, D]
        self._v: list[Optional[torch.Tensor]] = [None] * num_layers
        self._len = [0] * num_layers   # stored tokens
        self._seen = [0] * num_layers  # appended tokens (positions consumed)

    @property
    def seq_len(self) -> int:
        """Tokens appended so far; the next token's position."""
        return self._seen[0]

    def length(self, layer_idx: int) -> int:
        return self._len[layer_idx]

    def update(self, layer_idx: int, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor):
        """Append T new tokens to layer `layer_idx`; return all stored (k_BGSD, v_BGSD) views.

        Inference only: the buffers are written in place, so gradients do not flow through them.
        """
        n, T = self._len[layer_idx], k_BGTD.shape[2]
        buf_k = self._k[layer_idx]
        if buf_k is None or n + T > buf_k.shape[2]:
            self._grow(layer_idx, k_BGTD, v_BGTD, n + T)
        self._k[layer_idx][:, :, n:n + T] = k_BGTD
        self._v[layer_idx][:, :, n:n + T] = v_BGTD
        self._len[layer_idx] = n + T
        self._seen[layer_idx] += T
        return self.get(layer_idx)

    def get(self, layer_idx: int):
        """Stored (k_BGSD, v_BGSD) of one layer (views of the buffers)."""
        n = self._len[layer_idx]
        return self._k[layer_idx][:, :, :n], self._v[layer_idx][:, :, :n]

    def _grow(self, layer_idx: int, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, needed: int) -> None:
        capacity = -(-needed // self.chunk_size) * self.chunk_size
        n = self._len[layer_idx]
        for store, new in ((self._k, k_BGTD), (self._v, v_BGTD)):
            B, G, _, D = new.shape
            buf = new.new_empty(B, G, capacity, D)
            if store[layer_idx] is not None:
                buf[:, :, :n] = store[layer_idx][:, :, :n]
            store[layer_idx] = buf

    def nbytes(self) -> int:
        """Bytes actually resident in this cache's tensors (allocated capacity included)."""
        return sum(t.untyped_storage().nbytes() for t in self._k + self._v if t is not None)

    def reset(self) -> None:
        """Drop every stored token and free the buffers."""
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers
        self._len = [0] * self.num_layers
        self._seen = [0] * self.num_layers
