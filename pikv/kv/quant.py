"""Asymmetric min-max integer quantization with bit packing (the storage of the KIVI-style cache).

KIVI (Liu et al. 2024, arXiv:2402.02750): keys are quantized per channel (the scale/zero point is
shared by a group of tokens in one channel: key outliers live in fixed channels), values per token
(a group of channels of one token). Codes are packed 8/bits per uint8, so the bytes are real.
"""

from __future__ import annotations

import torch


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x -> (codes uint8 (unpacked, same shape), scale, zero) with scale/zero reduced over `dim`
    (kept as size 1) and stored in fp16; x ~= codes * scale + zero."""
    levels = 2 ** bits - 1
    mn = x.amin(dim=dim, keepdim=True).to(torch.float16)
    mx = x.amax(dim=dim, keepdim=True).to(torch.float16)
    scale = ((mx.float() - mn.float()) / levels).clamp_min(1e-8).to(torch.float16)
    codes = torch.round((x.float() - mn.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, mn


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2**bits, n divisible by 8 // bits) -> packed uint8 [..., n * bits / 8]."""
    per = 8 // bits
    n = codes.shape[-1]
    if 8 % bits or n % per:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into bytes")
    c = codes.view(*codes.shape[:-1], n // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)
