"""Code widths that do not divide a byte (3, 5, 6, 7 bits), stored as bit slices of widths that do.

A w-bit code is split into slices of 4, 2 and 1 bits from the top (5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 +
1, 3 = 2 + 1); each slice is planar-packed as `pikv.kv.quant.pack` packs whole codes, so the bytes
are exactly w/8 per code and every unpacking path stays the one of 1/2/4/8-bit codes. A slice with
shift s contributes code_s * 2^s: the attention that folds a scale into its sums (quant.py's
`_token_scores` / `_token_values`) runs once per slice with the scale times 2^s and the zero point on
the top slice only.

Why: on SmolLM2-135M at 8x, 5-bit rotated keys beside H2O beat the 4-bit ones of the default split
(48 development windows: +6.20% vs +8.27% perplexity; 48 held-out windows: +7.57% vs +8.86%, paired
-0.012 [-0.024, -0.0003] nats; docs/benchmarks.md), a width the 2/4/8-bit packing could not store.

The fused C++ decode kernel (pikv/kv/kernels/quant_decode.cpp) takes every slice of a tensor and
recombines a tile's slices into whole codes before its dot products: a slice costs one more unpack
per tile, not one more pass per query head. Measured (bench/kv_decode_speed.py, default model, 8x,
batch 1 and 4 at 8k and 16k tokens): rquant:k5v4+h2o decodes at 0.94-0.96x the tokens/s of
rquant+h2o (k4v4; 1.06x at batch 1, 16k, within that run's noise), where the torch blocks gave
0.49-0.64x the full cache's speed.
"""

from __future__ import annotations

import torch

MAX_BITS = 8


def slices(bits: int) -> list[tuple[int, int]]:
    """(slice width, shift) of a `bits`-wide code, top slice first: 8 -> [(8, 0)], 5 -> [(4, 1), (1, 0)]."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"code width {bits} bits: allowed 1 to {MAX_BITS}")
    out, left = [], bits
    for width in (8, 4, 2, 1):
        if left >= width:
            left -= width
            out.append((width, left))
    return out


def split(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """uint8 codes < 2**bits -> one uint8 tensor of codes per slice (`slices` order)."""
    return [(codes >> shift) & (2 ** width - 1) for width, shift in slices(bits)]


def names(prefix: str, bits: int) -> list[str]:
    """Buffer names of a tensor's slices: `kc` for the top one (the name of unsliced codes), then `kc1`, `kc2`."""
    return [f"{prefix}c"] + [f"{prefix}c{j}" for j in range(1, len(slices(bits)))]
