"""Quantized KV storage: asymmetric min-max integer quantization with bit packing, the KIVI store
(for selections that free nothing) and a per-token quantized store (any selection may evict).

KIVI (Liu et al. 2024, arXiv:2402.02750): keys are quantized per channel (the scale/zero point is
shared by a group of tokens in one channel: key outliers live in fixed channels), values per token
(a group of channels of one token). Codes are packed 8/bits per uint8, so the bytes are real.
"""

from __future__ import annotations

import torch

from pikv.kv.buffers import Buffers
from pikv.kv.storage import Store


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


class TokenQuantStore(Store):
    """Quantized storage that any selection may evict from: keys and values both quantized per
    token (min-max over groups of `group` channels, codes packed), as soon as they are appended, so
    every stored token stands alone. KIVI's per-channel key groups span `group` consecutive tokens,
    which an eviction would break (KiviStore: selections that free nothing)."""

    def __init__(self, bits: int, group: int, dtype=None, chunk: int = 256, capacity: int = 0):
        super().__init__(dtype, chunk, capacity)
        self.bits, self.group = bits, group

    def _fields(self, k_pre_BGTD, k_BGTD, v_BGTD):
        out = {}
        for name, x in (("k", k_BGTD), ("v", v_BGTD)):
            B, G, T, D = x.shape
            gc = min(self.group, D)
            codes, scale, zero = quantize(x.float().view(B, G, T, D // gc, gc), self.bits, dim=-1)
            out.update({f"{name}c": pack(codes.view(B, G, T, D), self.bits), f"{name}s": scale[..., 0],
                        f"{name}z": zero[..., 0]})
        return out

    def read(self, dtype, rope, pos, start, T):
        return self._dequant("k", dtype), self._dequant("v", dtype), None

    def _dequant(self, name: str, dtype) -> torch.Tensor:
        scale, zero = self.buf.view(f"{name}s"), self.buf.view(f"{name}z")
        B, G, S, n_groups = scale.shape
        codes = unpack(self.buf.view(f"{name}c"), self.bits).view(B, G, S, n_groups, -1)
        return dequantize(codes, scale[..., None], zero[..., None], dtype).view(B, G, S, -1)


class KiviStore(Store):
    """KIVI (Liu et al. 2024, arXiv:2402.02750): new tokens are appended in fp16 and attended (a
    prefill attends to its own prompt at full precision, as KIVI and kvpress do); once `residual` +
    `group` fp16 tokens exist, the oldest group of `group` tokens is quantized: keys per channel
    over the group's tokens, values per token over groups of channels. Buffers: the fp16 residual
    (capacity residual + group), the key codes and scales per group of tokens, the value codes and
    scales per token. Holds every token (no selection evicts from it)."""
    free_order = False

    def __init__(self, bits: int, group: int, residual: int, dtype=torch.float16, chunk: int = 256, capacity: int = 0):
        super().__init__(dtype or torch.float16, group, residual + group)  # self.buf: the fp16 residual k, v
        self.bits, self.group, self.residual = bits, group, residual
        # exact growth, one reallocation per quantized group (never per decoded token)
        self.kblocks = Buffers(1)  # kc [B, G, blocks, D * group * bits / 8], ks, kz [B, G, blocks, D]
        self.vtokens = Buffers(group)  # vc [B, G, tokens, D * bits / 8], vs, vz [B, G, tokens, D / group]

    def read(self, dtype, rope, pos, start, T):
        k, v = self.buf.view("k").to(dtype), self.buf.view("v").to(dtype)
        if not self.kblocks.n:
            return k, v, None
        g, bits = self.group, self.bits
        B, G, nblk, _ = self.kblocks.view("kc").shape
        D = k.shape[-1]
        kc = unpack(self.kblocks.view("kc"), bits).view(B, G, nblk, D, g).transpose(3, 4)  # [B,G,nblk,g,D]
        kq = dequantize(kc, self.kblocks.view("ks")[:, :, :, None], self.kblocks.view("kz")[:, :, :, None], dtype)
        gv = min(g, D)
        vc = unpack(self.vtokens.view("vc"), bits).view(B, G, nblk * g, D // gv, gv)
        vq = dequantize(vc, self.vtokens.view("vs")[..., None], self.vtokens.view("vz")[..., None], dtype)
        return torch.cat([kq.reshape(B, G, nblk * g, D), k], 2), torch.cat([vq.view(B, G, nblk * g, D), v], 2), None

    def settle(self):
        g, bits = self.group, self.bits
        groups = max(0, (self.buf.n - self.residual) // g)  # the oldest full groups leave the residual
        if groups:
            n = groups * g
            k, v = self.buf.view("k")[:, :, :n].float(), self.buf.view("v")[:, :, :n].float()
            B, G, _, D = k.shape
            gv = min(g, D)
            kc, ks, kz = quantize(k.view(B, G, groups, g, D), bits, dim=3)  # per channel over a group's tokens
            vc, vs, vz = quantize(v.view(B, G, n, D // gv, gv), bits, dim=-1)  # per token
            self.kblocks.write({"kc": pack(kc.transpose(3, 4).reshape(B, G, groups, D * g), bits),
                                "ks": ks.view(B, G, groups, D), "kz": kz.view(B, G, groups, D)})
            self.vtokens.write({"vc": pack(vc.reshape(B, G, n, D), bits), "vs": vs.view(B, G, n, -1),
                                "vz": vz.view(B, G, n, -1)})
            self.buf.keep_slices(0, n)
        self.buf.shrink(self.residual + g)

    def keep(self, idx_BHM):
        raise ValueError("KIVI storage holds every token: no selection may evict from it (TokenQuantStore may)")

    def length(self):
        return self.buf.n + self.vtokens.n

    def final_tokens(self):
        return self.vtokens.n  # the fp16 residual's keys change when their group is quantized

    def nbytes(self):
        return self.buf.nbytes() + self.kblocks.nbytes() + self.vtokens.nbytes()

    def token_bytes(self):
        D = self.buf.t["k"].shape[-1]
        return D * self.bits // 4 + 4 * (D // min(self.group, D)) + 4 * D // self.group
