"""Intervals of the evaluations: the percentile bootstrap of a mean over sequences."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(x: np.ndarray, iters: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of mean(x) over its entries (seeded: reruns agree)."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(iters, len(x)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
