"""A resumable, data-parallel sample stream over a fixed set of N samples (the `task=flex` and
`task=time` loaders; the LM streams token blocks with pikv.data.loader.BlockLoader).

Global sample g of the stream is sample order(epoch)[g % N] with epoch = g // N, and the order of
an epoch is a pure function of (seed, epoch); rank r of D takes global samples
[c + r*B, c + (r+1)*B) of the batch starting at c. The state is one integer, so k steps + resume
+ (n-k) steps sees exactly the samples of n steps.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np


class SampleLoader:
    """`next_batch()` -> gather(ids) for this rank's slice of the next global batch.

    order(rng) -> permutation of range(N) for one epoch (default: uniform shuffle); Flex-MoE
    passes one that puts samples with more modalities first.
    """

    def __init__(self, num_samples: int, batch_size: int, gather: Callable[[np.ndarray], tuple],
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 order: Optional[Callable[[np.random.Generator], np.ndarray]] = None):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: the training split is empty")
        if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"batch_size={batch_size}, dp_rank={dp_rank}, dp_size={dp_size}: need "
                             "batch_size >= 1 and 0 <= dp_rank < dp_size")
        self.n, self.batch_size, self.gather = num_samples, batch_size, gather
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self._order_fn = order or (lambda rng: rng.permutation(num_samples))
        self.consumed_samples = 0  # global, over all ranks
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            self._cached = (epoch, np.asarray(self._order_fn(np.random.default_rng([self.seed, epoch]))))
        return self._cached[1]

    def sample_ids(self, first: int, count: int) -> np.ndarray:
        g = np.arange(first, first + count)
        return np.array([self._order(int(i // self.n))[i % self.n] for i in g], dtype=np.int64)

    def next_batch(self) -> tuple:
        ids = self.sample_ids(self.consumed_samples + self.dp_rank * self.batch_size, self.batch_size)
        self.consumed_samples += self.batch_size * self.dp_size
        return self.gather(ids)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": self.n}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_samples", self.n)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state {key}={state[key]!r} does not match this loader's "
                                 f"{key}={mine!r}: resuming onto different data")
        self.consumed_samples = int(state["consumed_samples"])
