"""Throughput accounting: tokens/s and model FLOPs utilisation (MFU).

MFU = achieved model FLOPs / peak FLOPs of the device. Vendor peaks mean little on a shared
CPU, so the peak is *measured*: the best of a few large square matmuls in the training dtype,
on this process's device and thread budget (< 1 s). `bench/matmul_peak.py` prints the same
number for the docs.
"""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32,
                        n: int = 1024, repeats: int = 5) -> float:
    """Best observed FLOP/s of an n x n x n matmul on `device` (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        (a @ b).sum().item()
        elapsed = time.perf_counter() - start
        if i > 0:  # the first call pays for allocation and kernel selection
            best = min(best, elapsed)
    return 2 * n**3 / best


class ThroughputMeter:
    """Tokens/s and MFU over the interval since the last `read()`."""

    def __init__(self, flops_per_token: float, peak_flops: float, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, global_tokens: int) -> None:
        self.tokens += global_tokens

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)
        self.tokens, self.start = 0, now
        return {"tokens_per_s": tokens_per_s, "mfu": mfu}
