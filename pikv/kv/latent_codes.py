"""How the learned latent's codes are stored: fp16, int8 with one fp16 scale per token, or 4 bits
(uniform int4 or NF4) with one fp16 scale per group of consecutive latent coordinates (`LatentFormat`).

Shapes: B batch, T tokens, r latent rank, W = ceil(r / 2) packed bytes, Q = ceil(r / group) scale
groups, G kv heads, P rotated key dims held apart.

int4 follows Palu (arXiv:2407.21118), which quantizes its low-rank latents per group: the latent is
PCA-ordered (pikv/kv/fit.py), so neighbouring coordinates have similar scale and one absmax scale
fits a group of them, where one scale per token would waste the 16 levels of the small trailing
coordinates on the range of the leading ones. Symmetric codes in [-7, 7] (zero is exact, no zero
point to store), two per byte (the even coordinate in the low nibble). Every scale is rounded to
fp16 before the codes are formed, so what a cache stores is exactly what the training round trip
used (`round_trip`, with a straight-through gradient). The rotated key dims a decoupled latent holds
apart stay int8 (one fp16 scale per token over its kv heads) whenever the codes are <= 8 bits.

NF4 (QLoRA, arXiv:2305.14314) spends the same 4 bits on 16 levels at the quantiles of a normal
distribution scaled to the group's absmax, where uniform int4 has 15 evenly spaced ones: a latent
coordinate group is close to normal, and on normal groups of 16 / 32 NF4's squared error is 10% /
19% lower than uniform int4's at the same bytes (an evaluation format: training round trips use
whichever format the compressor was built with).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LATENT_BITS = (4, 8, 16)
LATENT_GROUP = 32  # latent coordinates per fp16 scale of int4 codes (Palu's group size)
SCALE_BYTES = 2  # one fp16 scale
INT4_MAX = 7  # symmetric int4: codes -7..7, stored offset by 8 in a nibble
# NF4's 16 levels (bitsandbytes' table, QLoRA appendix E): normal quantiles in [-1, 1], 0 exact
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def quantize_latent(c_BTR: torch.Tensor, dims: tuple[int, ...] = (-1,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: (codes int8, fp16 scale with `dims` reduced to 1: [B, T, 1] for
    a latent [B, T, r]). The scale is rounded to fp16 before the codes are formed."""
    scale = (c_BTR.detach().float().abs().amax(dims, keepdim=True) / 127).clamp_min(1e-6).half()
    codes = torch.round(c_BTR.float() / scale.float()).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_latent(codes_BTR: torch.Tensor, scale_BT1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes_BTR.float() * scale_BT1.float()).to(dtype)


def straight_through_int8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The int8 round trip of `x` (scale over `dims`) in the forward, the identity in the backward."""
    return x + (dequantize_latent(*quantize_latent(x.detach(), dims), x.dtype) - x).detach()


def _grouped(x_BTR: torch.Tensor, group: int) -> torch.Tensor:
    """[..., r] -> [..., Q, group], the last group zero-padded (a zero changes no absmax)."""
    r = x_BTR.shape[-1]
    return F.pad(x_BTR, (0, -r % group)).unflatten(-1, (-1, group))


def quantize_int4(c_BTR: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per token per group of `group` coordinates: (codes int8 in [-7, 7] [B, T, r],
    fp16 scales [B, T, Q])."""
    x_BTQG = _grouped(c_BTR.detach().float(), group)
    scale_BTQ = (x_BTQG.abs().amax(-1) / INT4_MAX).clamp_min(1e-6).half()
    codes = torch.round(x_BTQG / scale_BTQ.float()[..., None]).clamp_(-INT4_MAX, INT4_MAX)
    return codes.flatten(-2)[..., :c_BTR.shape[-1]].to(torch.int8), scale_BTQ


def dequantize_int4(codes_BTR: torch.Tensor, scale_BTQ: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    r = codes_BTR.shape[-1]
    return (_grouped(codes_BTR.float(), group) * scale_BTQ.float()[..., None]).flatten(-2)[..., :r].to(dtype)


def quantize_nf4(c_BTR: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 per token per group: (the nearest level's index - 8, int8 in [-8, 7] [B, T, r], so that
    pack_int4 stores it; fp16 absmax scales [B, T, Q])."""
    x_BTQG = _grouped(c_BTR.detach().float(), group)
    scale_BTQ = x_BTQG.abs().amax(-1).clamp_min(1e-6).half()
    levels = torch.tensor(NF4_LEVELS, device=c_BTR.device)
    # nearest level = the count of midpoints below the value (levels are sorted)
    idx = torch.bucketize(x_BTQG / scale_BTQ.float()[..., None], (levels[1:] + levels[:-1]) / 2)
    return (idx.flatten(-2)[..., :c_BTR.shape[-1]] - 8).to(torch.int8), scale_BTQ


def dequantize_nf4(codes_BTR: torch.Tensor, scale_BTQ: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    values = torch.tensor(NF4_LEVELS, device=codes_BTR.device)[codes_BTR.long() + 8]
    return dequantize_int4(values, scale_BTQ, group, dtype)


def pack_int4(codes_BTR: torch.Tensor) -> torch.Tensor:
    """int4 codes [..., r] (int8 in [-8, 7]) -> uint8 [..., ceil(r / 2)], two codes per byte."""
    u = (codes_BTR.to(torch.int16) + 8).to(torch.uint8)
    u = F.pad(u, (0, u.shape[-1] % 2))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed_BTW: torch.Tensor, rank: int) -> torch.Tensor:
    """uint8 [..., W] -> int4 codes [..., rank] as int8 (the inverse of pack_int4)."""
    both = torch.stack([packed_BTW & 15, packed_BTW >> 4], -1).flatten(-2)[..., :rank]
    return both.to(torch.int8) - 8


@dataclass(frozen=True)
class LatentFormat:
    """Code width of the latent (4, 8 or 16 bits) and, for 4 bits, coordinates per fp16 scale and
    whether the levels are NF4's. Name: `b16`, `b8`, `b4g32`, `nf4g16` (the registry's `learned:FORMAT`)."""
    bits: int = 16
    group: int = LATENT_GROUP
    nf: bool = False

    def __post_init__(self):
        if self.bits not in LATENT_BITS:
            raise ValueError(f"kv latent bits {self.bits} is not supported: allowed {LATENT_BITS}")
        if not (isinstance(self.group, int) and self.group >= 1):
            raise ValueError(f"kv latent group {self.group!r} must be an int >= 1 (latent coordinates per int4 scale)")
        if self.nf and self.bits != 4:
            raise ValueError(f"kv latent NF levels are 4-bit codes, not {self.bits}-bit")

    @property
    def name(self) -> str:
        return f"{'nf' if self.nf else 'b'}4g{self.group}" if self.bits == 4 else f"b{self.bits}"

    def scales(self, rank: int) -> int:
        """fp16 scales per token: none (fp16), one (int8), one per group (int4)."""
        return {16: 0, 8: 1, 4: math.ceil(rank / self.group)}[self.bits]

    def token_bytes(self, rank: int) -> int:
        """Bytes of one token's codes at `rank`: ceil(rank * bits / 8) + 2 per scale (int4 codes packed in pairs)."""
        return math.ceil(rank * self.bits / 8) + SCALE_BYTES * self.scales(rank)

    def rotary_bytes(self, num_kv_heads: int, rotary_dims: int) -> int:
        """Bytes per token of the rotated key dims a decoupled latent holds apart: int8 + one fp16
        scale (codes <= 8 bits), else fp16; 0 for the joint latent (rotary_dims 0)."""
        if not rotary_dims:
            return 0
        return num_kv_heads * rotary_dims + SCALE_BYTES if self.bits <= 8 else num_kv_heads * rotary_dims * 2

    def store(self, c_BTR: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What a cache holds for latent codes [B, T, r]: `c` (+ `c_scale`)."""
        if self.bits == 8:
            return dict(zip(("c", "c_scale"), quantize_latent(c_BTR)))
        if self.bits == 4:
            codes, scale = self._quantize(c_BTR)
            return {"c": pack_int4(codes), "c_scale": scale}
        return {"c": c_BTR.to(dtype)}

    def load(self, stored: dict[str, torch.Tensor], dtype: torch.dtype, rank: int) -> torch.Tensor:
        """The latent [B, T, rank] back from what `store` returned (concatenated over tokens)."""
        if self.bits == 8:
            return dequantize_latent(stored["c"], stored["c_scale"], dtype)
        if self.bits == 4:
            return self._dequantize(unpack_int4(stored["c"], rank), stored["c_scale"], dtype)
        return stored["c"].to(dtype)

    def _quantize(self, c_BTR):
        return (quantize_nf4 if self.nf else quantize_int4)(c_BTR, self.group)

    def _dequantize(self, codes_BTR, scale_BTQ, dtype):
        return (dequantize_nf4 if self.nf else dequantize_int4)(codes_BTR, scale_BTQ, self.group, dtype)

    def round_trip(self, c_BTR: torch.Tensor) -> torch.Tensor:
        """`load(store(c))` in the forward, the identity in the backward (straight-through)."""
        if self.bits == 16:
            return c_BTR
        if self.bits == 8:
            return straight_through_int8(c_BTR, (-1,))
        c = c_BTR.detach()
        return c_BTR + (self._dequantize(*self._quantize(c), c.dtype) - c)

    def store_rotary(self, k_rot_BGTP: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What a decoupled cache holds for the rotated key dims [B, G, T, P] (after RoPE)."""
        if self.bits <= 8:
            return dict(zip(("kr", "kr_scale"), quantize_latent(k_rot_BGTP, (1, 3))))
        return {"kr": k_rot_BGTP.to(dtype)}

    def rotary_round_trip(self, k_rot_BGTP: torch.Tensor) -> torch.Tensor:
        return straight_through_int8(k_rot_BGTP, (1, 3)) if self.bits <= 8 else k_rot_BGTP


def parse_latent_format(text: str) -> LatentFormat:
    """'b4' / 'b4g16' / 'nf4g16' / 'b8' / 'b16' -> LatentFormat; ValueError naming the text and what
    is allowed."""
    m = re.fullmatch(r"(b|nf)(\d+)(?:g(\d+))?", text.strip().lower())
    bits = int(m[2]) if m else 0
    # a group size and NF levels exist for 4-bit codes only
    if bits not in LATENT_BITS or ((m[3] or m[1] == "nf") and bits != 4) or (m[3] and int(m[3]) < 1):
        raise ValueError(f"learned latent format {text!r} must be b4[gG], nf4[gG], b8 or b16: code bits in "
                         f"{', '.join(map(str, LATENT_BITS))}, G latent coordinates per fp16 scale >= 1 for "
                         f"4-bit codes only (default {LATENT_GROUP}; 8-bit codes have one scale per token), "
                         f"nf: NF4's normal-quantile levels instead of uniform int4")
    return LatentFormat(bits, int(m[3]) if m[3] else LATENT_GROUP, m[1] == "nf")
