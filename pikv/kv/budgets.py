"""Budgets of the KV policies: tokens per layer for a ratio, SnapKV's window, PyramidKV's per-layer
budgets (kvpress's formula) and KIVI's bit width / fp16 residual plan with its exact bytes. Pure
functions of sizes, shared by `make_cache` and the tests; and the check of the learned compressor's
budgets (`check_latent_budgets`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from pikv.config import OptionError
from pikv.kv.bitslice import slices
from pikv.kv.latent_codes import LATENT_BITS
from pikv.kv.learned import latent_rank


@dataclass
class KVOptions:
    """Settings of the storage formats and selection rules (defaults: their papers' / kvpress's)."""
    sinks: int = 4  # StreamingLLM attention sinks
    h2o_recent_fraction: float = 0.5  # H2O: half heavy hitters, half recent tokens
    # SnapKV / PyramidKV as kvpress 0.5.5 computes them (SnapKVPress / PyramidKVPress defaults):
    # observation window of the last 64 prompt queries (kept, as part of the budget), average pool
    # of kernel 5 over key positions. A budget M <= the window cannot hold it: make_cache then
    # uses a window of M // 2 (`snap_window_for`); kvpress asserts instead.
    snap_window: int = 64
    snap_kernel: int = 5
    pyramid_beta: float = 20.0  # PyramidKV: kvpress's beta (budget of the last layer = mean / beta)
    lru_hit_fraction: float = 0.125  # LRU: the top fraction of the budget by attention counts as "used"
    quest_page: int = 16
    quant_group: int = 32  # tokens per key group (per channel) and channels per value group
    # Recent tokens kept in fp16 beyond the group being filled (KIVI's residual; KIVI uses 128 on
    # 4k-token contexts). None = auto (`quant_plan`): the largest multiple of quant_group up to 128
    # whose bytes still meet the requested ratio at total_tokens (0 when total_tokens is unknown).
    quant_residual: Optional[int] = None
    # rquant (rotated per-token codes, pikv/kv/quant.py RotatedQuantStore): channels per fp16
    # scale/zero group when a format names none (capped at the head dim: one group per token and
    # head), and the seed of the rotation's random signs.
    rquant_group: int = 64
    rotation_seed: int = 0
    # Compress the prefill only and let generated tokens accumulate (kvpress's protocol, for the
    # side-by-side bench); the default enforces the budget after every step.
    prefill_only: bool = False


def token_budget(ratio: Optional[float], tokens: Optional[int], total_tokens: Optional[int]) -> int:
    """Tokens kept per layer: `tokens`, or ceil(total_tokens / ratio)."""
    if (ratio is None) == (tokens is None):
        raise ValueError(f"give exactly one of a compression ratio and a token budget (ratio={ratio}, tokens={tokens})")
    if tokens is not None:
        if tokens < 1:
            raise ValueError(f"kv token budget {tokens} is impossible: must be >= 1")
        return int(tokens)
    if not ratio >= 1:
        raise ValueError(f"kv compression ratio {ratio} is impossible: must be >= 1 (1 = full cache)")
    if total_tokens is None:
        raise ValueError("a compression ratio needs the total number of tokens of the sequence")
    return max(1, math.ceil(total_tokens / ratio))


def snap_window_for(window: int, budget: int) -> int:
    """SnapKV's observation window (kept as part of the budget) for a budget of `budget` tokens:
    kvpress's window when it leaves room for scored tokens, else half the budget (kvpress asserts)."""
    return window if window < budget else max(1, budget // 2)


def pyramid_budgets(mean: float, num_layers: int, beta: float, window: int,
                    length: Optional[int] = None, minimum: int = 1) -> list[int]:
    """PyramidKV (Cai et al. 2024, arXiv:2406.02069) per-layer budgets, exactly kvpress 0.5.5's
    `PyramidKVPress.get_layer_budget` (from KVCache-Factory): the first layer keeps max_num, the
    last min_num = mean / beta, linearly in between, max_num + min_num = 2 * mean; max_num is capped
    at length - window (length: the tokens a layer will see, unknown = no cap) and min_num raised
    to keep the mean. When that pyramid does not fit (length >= max_num >= min_num >= window
    fails) every layer keeps `mean` (SnapKV), as kvpress falls back. Budgets are rounded per layer
    (Python round, as kvpress), so the total can differ from num_layers * mean by < num_layers / 2;
    the measured bytes show it."""
    min_num = mean / beta
    max_num = 2 * mean - min_num
    if length is not None and max_num >= length - window:
        max_num = length - window
        min_num = 2 * mean - max_num
    uniform = [max(minimum, round(mean))] * num_layers
    if not ((length is None or length >= max_num) and max_num >= min_num >= window):
        return uniform
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    out = [round(max_num - i * steps) for i in range(num_layers)]
    return out if min(out) >= minimum else uniform


def quant_bits_for_ratio(ratio: float) -> int:
    """KIVI bit width for a requested ratio: 4 bits (~3x with scales) up to 3x, 2 bits (~5x) up to 5x."""
    if ratio <= 3.0:
        return 4
    if ratio <= 5.0:
        return 2
    raise ValueError(f"kv compression ratio {ratio} is impossible for quant: 2-bit codes with fp16 "
                     "scales/zero points reach about 5x (allowed ratios <= 5)")


def quant_nbytes_per_head(tokens: int, head_dim: int, bits: int, group: int, residual: int) -> int:
    """Bytes the KIVI store allocates per kv head for `tokens` tokens (what nbytes() measures):
    fp16 tokens wait until residual + group of them exist, then the oldest groups are quantized
    (packed codes, fp16 scale + zero point per key channel per group, per value token per channel
    group); the fp16 residual buffer holds residual + group tokens (its capacity, allocated)."""
    fp16 = tokens if tokens < residual + group else residual + (tokens - residual) % group
    nq = tokens - fp16
    per_token = head_dim * bits // 4 + 4 * (head_dim // min(group, head_dim))  # K+V codes, value scale/zero
    return nq * per_token + (nq // group) * 4 * head_dim + max(fp16, residual + group) * 4 * head_dim


def quant_token_ratio(head_dim: int, bits: int, group: int) -> float:
    """Nominal ratio of the per-token quantized store (fp16 K+V bytes / codes + scales + zero points)."""
    return QuantFormat(bits, bits, group).ratio(head_dim)


QUANT_BITS = tuple(range(1, 9))  # code widths; 3, 5, 6, 7 are stored as bit slices (pikv/kv/bitslice.py)


@dataclass(frozen=True)
class QuantFormat:
    """Per-token codes of a quantized store: key bits, value bits, channels per fp16 scale + zero
    point (capped at the head dim). Name: `k4v2g64`."""
    key_bits: int
    value_bits: int
    group: int

    @property
    def name(self) -> str:
        return f"k{self.key_bits}v{self.value_bits}g{self.group}"

    def token_bytes(self, head_dim: int) -> int:
        """Bytes of one token of one kv head: K and V codes, an fp16 scale + zero per group of each."""
        return head_dim * (self.key_bits + self.value_bits) // 8 + 8 * (head_dim // min(self.group, head_dim))

    def ratio(self, head_dim: int) -> float:
        """Nominal ratio against fp16 keys + values (4 bytes per channel)."""
        return 4 * head_dim / self.token_bytes(head_dim)

    def check(self, head_dim: int) -> "QuantFormat":
        g = min(self.group, head_dim)
        if head_dim % g:
            raise ValueError(f"quant format {self.name!r}: group {self.group} must divide the head dim {head_dim}")
        for bits in (self.key_bits, self.value_bits):  # each slice packs 8 / width codes of a group per byte
            per = max(8 // width for width, _ in slices(bits))
            if g % per:
                raise ValueError(f"quant format {self.name!r}: {bits}-bit codes pack {per} per byte, so the group "
                                 f"of {g} channels must be a multiple of {per}")
        return self


def parse_quant_format(text: str, default_group: int) -> QuantFormat:
    """'k4v2' / 'k4v2g64' -> QuantFormat (group `default_group` when not named); ValueError naming the text."""
    m = re.fullmatch(r"k(\d+)v(\d+)(?:g(\d+))?", text.strip().lower())
    if not m or int(m[1]) not in QUANT_BITS or int(m[2]) not in QUANT_BITS or (m[3] and int(m[3]) < 1):
        raise ValueError(f"quant format {text!r} must be kKvV[gG]: key and value bits in "
                         f"{QUANT_BITS[0]} to {QUANT_BITS[-1]}, G channels per scale group >= 1 (e.g. k4v2g64, k5v4)")
    return QuantFormat(int(m[1]), int(m[2]), int(m[3]) if m[3] else default_group)


# rquant's formats, mildest first (keys keep at least the values' bits: KIVI and KVQuant find keys
# the more sensitive); the split rule and an explicit share pick among them.
RQUANT_LADDER = ((8, 8), (8, 4), (5, 4), (4, 4), (4, 2), (2, 2))


def rquant_format(ratio: Optional[float], head_dim: int, group: int, share: Optional[float] = None,
                  alone: bool = False) -> QuantFormat:
    """The format of rquant storage (docs/kv.md, "One byte budget"): alone, the mildest ladder format
    that meets `ratio`; with an explicit `share`, the mildest whose nominal ratio reaches it; in a
    composition by default, RQUANT_SPLIT. ValueError when none fits."""
    formats = [QuantFormat(k, v, group).check(head_dim) for k, v in RQUANT_LADDER]
    want = ratio if alone else share
    if want is not None:
        got = next((f for f in formats if f.ratio(head_dim) >= want - 1e-9), None)
        if got is None:
            strongest = formats[-1]
            raise ValueError(f"rquant {'ratio' if alone else 'share'} {want:g} is beyond its strongest format "
                             f"({strongest.name}, {strongest.ratio(head_dim):.2f}x): allowed <= "
                             f"{strongest.ratio(head_dim):.2f}" + ("" if alone else " (the selection takes the rest)"))
        return got
    return rquant_split(ratio, head_dim, formats)


# The default split of rquant x a selection, chosen on development windows (the embedded corpus's
# train split, SmolLM2-135M, rquant+h2o; docs/benchmarks.md): 2-bit codes are never worth it (values
# 2-bit: +16-23% alone, keys 2-bit: +500%); k8v4 is lossless (-0.4% at 2.46x), so values keep 4 bits
# and 8-bit values (k8v8) only serve ratios below k8v4's; k4v4 costs ~3-5% at 3.56x. At 4x k8v4 + H2O
# 1.63x beat k4v4 + H2O 1.12x (+0.6% vs +5.1%) and k5v4 + H2O 1.25x (+1.8% vs +1.2%); at 8x k5v4 +
# H2O 2.5x beat k4v4 + H2O 2.25x (48 windows: +6.2% vs +8.3%; 48 held-out windows: +7.6% vs +8.9%,
# paired interval excluding 0) and k8v4 + H2O 3.25x (+8.7%); at 16x k4v4 + H2O 4.5x beat k8v4 + H2O
# 6.5x (+21.5% vs +27.4%): eviction beyond ~2.5x costs more than the key bits it buys back.
RQUANT_SPLIT_FORMATS = ((8, 4), (5, 4), (4, 4))
RQUANT_MAX_SELECTION = 2.5


def rquant_split(ratio: Optional[float], head_dim: int, formats: list[QuantFormat]) -> QuantFormat:
    """The default format of rquant in a composition at `ratio`: of RQUANT_SPLIT_FORMATS no stronger
    than the ratio, the mildest that leaves the selection <= RQUANT_MAX_SELECTION, else k4v4 (the
    strongest of them); a ratio below all of them gets k8v8 (below its ratio too, the registry
    reports the impossible split). No ratio (a token budget): k4v4."""
    split = [f for f in formats if (f.key_bits, f.value_bits) in RQUANT_SPLIT_FORMATS]
    if ratio is None:
        return split[-1]
    fits = [f for f in split if f.ratio(head_dim) <= ratio + 1e-9]
    if not fits:
        return next(f for f in formats if (f.key_bits, f.value_bits) == (8, 8))
    return next((f for f in fits if ratio / f.ratio(head_dim) <= RQUANT_MAX_SELECTION + 1e-9), fits[-1])


def quant_plan(ratio: float, head_dim: int, total_tokens: Optional[int] = None, group: int = 32,
               residual: Optional[int] = None) -> tuple[int, int]:
    """(bits, fp16 residual) for a requested ratio. With total_tokens (the sequence the cache will
    hold; the ratio is checked at total_tokens - 1 and total_tokens, the peak of a decode): 4 bits
    if they meet the ratio, else 2; residual None picks KIVI's residual, the largest multiple of
    `group` up to 128 whose bytes still meet the ratio (0 if none does: then short sequences measure
    below the requested ratio, their partial group being fp16). Without total_tokens: the fixed
    rule of quant_bits_for_ratio and residual 0."""
    bits = quant_bits_for_ratio(ratio)  # raises above 5x
    if total_tokens is None:
        return bits, residual or 0
    lengths = [max(1, total_tokens - 1), total_tokens]

    def meets(b: int, R: int) -> bool:
        return all(4 * head_dim * n >= ratio * quant_nbytes_per_head(n, head_dim, b, group, R) for n in lengths)

    bits = 4 if meets(4, residual or 0) else 2
    if residual is None:
        residual = max([R for R in range(0, 129, group) if meets(bits, R)], default=0)
    return bits, residual


def check_latent_budgets(num_kv_heads: int, head_dim: int, ratios: list[float], bits: int, window: int,
                         length: int, rotary_dims: int = 0) -> None:
    """The learned compressor's budgets (pikv/kv/learned.py): `bits` a supported code width, every
    ratio of `ratios` leaves a latent rank >= 1, alone and beside the `window` exact tokens of a
    `length`-token sequence, `rotary_dims` key dims per head held apart (the decoupled latent).
    OptionError (a ValueError naming the argument) otherwise."""
    if bits not in LATENT_BITS:
        raise OptionError("bits", bits, "must be 4 (int4 codes + an fp16 scale per 32 latent coordinates), "
                          "8 (int8 codes + an fp16 scale per token) or 16 (fp16 codes)")
    if not ratios:
        raise OptionError("ratios", list(ratios), "must be a non-empty list of compression ratios")
    for r in ratios:
        try:
            latent_rank(num_kv_heads, head_dim, r, bits, rotary_dims=rotary_dims)
        except ValueError as err:
            raise OptionError("ratios", list(ratios), f"must each leave the latent a rank >= 1: {err}") from None
    if window < 0:
        raise OptionError("window", window, "must be >= 0 (0 = latent only)")
    try:
        for r in ratios:
            latent_rank(num_kv_heads, head_dim, r, bits, window, length, rotary_dims)
    except ValueError as err:
        raise OptionError("window", window, "must leave every {ratios} budget a latent (" + str(err).replace("{", "(")
                          .replace("}", ")") + ")", ratios=list(ratios)) from None
