"""Equal measured bytes: the budget a method must be given so that its measured compression (peak
bytes of the fp16 full cache / its peak bytes, `KVCache.peak_nbytes`) reaches a target.

The registry splits a ratio by nominal sizes (codes, kept tokens); what a cache allocates on top
(positions and scores of an evicting selection, KIVI's fp16 partial group, one slot of capacity)
makes its measured ratio fall a few percent short, differently per method. The Pareto table
compares methods at equal measured bytes, so each (method, target) is first given the mildest
budget that reaches the target. Bytes depend on shapes only, never on the values: a dry run of
the cache alone on random keys/values (the model's rotary, B = 1, the evaluation's prefill and
decode steps) measures them exactly and cheaply, without the model's forward; with equal budgets
in every layer one layer stands for all.
"""

from __future__ import annotations

from typing import Optional

import torch

from pikv.kv import make_cache

MAX_STEPS = 8  # proportional steps (measured ~ budget x a constant): 2-3 suffice in practice
STALLS = 2  # steps that leave the bytes unchanged before giving up


@torch.no_grad()
def dry_run_peak(model, cache, total: int, prefill: int, layers: int) -> int:
    """`cache.peak_nbytes` after the evaluation's steps (prefill `prefill` tokens, then one per step
    up to total - 1) on random keys/values of one sequence in its first `layers` layers."""
    cfg = model.cfg
    D = cfg.hidden_size // cfg.num_heads
    gen = torch.Generator().manual_seed(0)
    for start, T in [(0, prefill)] + [(t, 1) for t in range(prefill, total - 1)]:
        for li in range(layers):
            q = torch.randn(1, cfg.num_heads, T, D, generator=gen)
            k = torch.randn(1, cfg.num_kv_heads, T, D, generator=gen)
            v = torch.randn(1, cfg.num_kv_heads, T, D, generator=gen)
            cache.attend(li, q, model.rope(k, start), v, k_pre_BGTD=k, rope=model.rope, start=start)
    return cache.peak_nbytes


def dry_run_ratio(model, policy: str, ratio: Optional[float], total: int, prefill: int, svd_bases=None) -> float:
    """Measured ratio of `policy` at `ratio` for sequences of `total` tokens decoded as the
    evaluation does: fp16 full peak bytes / the method's, from the caches' own accounting."""
    method = make_cache(policy, model, ratio=None if policy == "full" else ratio, total_tokens=total,
                        svd_bases=svd_bases)
    # Layers with equal budgets allocate alike step by step: one stands for all, against one layer
    # of the full cache (the ratio is the same); per-layer budgets (PyramidKV) run every layer.
    layers = 1 if len(set(method.budgets or [0])) == 1 else model.cfg.num_layers
    full = make_cache("full", model, total_tokens=total)
    return dry_run_peak(model, full, total, prefill, layers) / dry_run_peak(model, method, total, prefill, layers)


def match_budget(model, policy: str, target: float, total: int, prefill: int, svd_bases=None) -> tuple[float, float]:
    """(budget ratio to give make_cache, its measured ratio): the target itself when it already
    measures >= target, else budgets raised in proportion to the shortfall until it does; the
    target itself when raising the budget does not shrink the bytes (Quest: two steps, each 1% further
    beyond proportional, gain nothing) or 8 steps do not reach it.
    ValueError (the registry's) when some budget on the way is impossible for the method."""
    budget, beyond, stalled = target, 1.001, 0  # 0.1% beyond proportional: ceil() steps converge from above
    measured = first = dry_run_ratio(model, policy, budget, total, prefill, svd_bases)
    for _ in range(MAX_STEPS):
        if measured >= target * (1 - 1e-9):
            return budget, measured
        budget *= target / measured * beyond
        last, measured = measured, dry_run_ratio(model, policy, budget, total, prefill, svd_bases)
        # no gain: a step too small to move a ceil() (a token budget behind a capped latent's split),
        # a step whose ceil()s moved the wrong way (a latent share beside a selection that keeps fewer
        # tokens than the prefill: the prefill's peak and the rank re-sized for the kept tokens trade
        # places, learned@4+h2o 7.653x -> 7.650x), or bytes that never shrink (Quest frees nothing)
        if measured <= last:
            stalled += 1
            beyond *= 1.01
        if stalled == STALLS:
            break
    return target, first  # not reachable: evaluated as requested, its measured ratio shown
