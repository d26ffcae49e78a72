"""Quantized KV storage: asymmetric min-max integer quantization with bit packing, the KIVI store
(for selections that free nothing) and a per-token quantized store (any selection may evict).

KIVI (Liu et al. 2024, arXiv:2402.02750): keys are quantized per channel (the scale/zero point is
shared by a group of tokens in one channel: key outliers live in fixed channels), values per token
(a group of channels of one token). Codes are packed 8/bits per uint8, so the bytes are real.

Both stores attend in the compressed domain (`attend`), block by block with an online softmax, so
a step never builds a full-precision copy of the cache: per-channel keys fold their scale into the
query per token group and their zero point into one dot product per group; per-token keys and
values fold theirs into the scores / the attention weights. Only a block's codes are unpacked, into
a preallocated buffer. Why this shape (one-off timings of the alternatives, best of 20-40 calls, 1
thread on the shared 2-core Xeon at load 1-15, so only the large gaps count; batch 4, 8k tokens,
head dim 32: 2M codes per tensor; bench/kv_decode_speed.py has the end-to-end numbers):
- packing is planar: byte k of a row of n codes holds codes k, k + n*bits/8, ... in its bit fields,
  so unpacking is `per` whole-row shifts of the packed bytes read as int64 (8 codes per lane), one
  mask and one uint8 -> fp32 copy: 0.57 ms, where shifting every byte into its own slot (the old
  interleaved layout) took 3.7 ms (int32: 4.1 ms) and a 256-entry lookup table (index_select) 1.5 ms;
- codes are unpacked to fp32 and multiplied with fp32 matmuls: exact integer codes, so the folded
  scales keep fp32 accuracy (int8 matmuls would quantize the query; bf16 would round it); one
  matmul per plane (a broadcast over the planes copied the query / weights: keys 1.35 -> 0.73 ms);
  no out= arguments, so a cache used with autograd enabled still works;
- torch.compile of the fused block (unpack + folded scores + softmax + values) with dynamic shapes
  (the cache grows every step) compiled for 137 s and then ran in 26 ms vs 1.2 ms eager (batch 1,
  8k): not used;
- blocks of ~2^19 codes (2 MB of fp32, this CPU's L2 per core) bound the scratch memory; 2^17 to
  2^21 measured alike (within the noise); fewer, larger blocks mean fewer Python-level ops per step.
What was left is dispatch: a decode step of one layer runs ~60 small ops here against the full
cache's cast + SDPA. So a decode step (one query per sequence) on the CPU now runs one fused C++
op (pikv/kv/kernels/quant_decode.cpp, `_attend_fused`): per (batch row, kv head), tiles of 64
tokens are unpacked once and scored for all of the kv head's query heads with the same folded
scales, an online softmax per tile, the values accumulated from their codes, then the exact
residual; the bit widths are read off the buffers' shapes (keys and values may differ; bit slices,
pikv/kv/bitslice.py, are recombined into whole codes per tile). Prefill and chunks, CUDA tensors,
autograd through the cache and `fused_kernel = False` keep the torch blocks below (same numbers
within fp32 reordering; a Triton kernel for CUDA is future work).
Measured (docs/benchmarks.md, "Fused C++ decode kernel"): 1.16-1.29x the torch blocks at 2k and
for the 8x compositions at 16k, equal at 8k, slower for KIVI at 16k batch 4 (0.86x): not the step
change hoped for; the per-token arithmetic at head dim 32 is now what costs. Its AVX-512 build
since (tokens across the lanes, docs/benchmarks.md "AVX-512 decode kernel"): KIVI 1.5-3.2x the full
cache from 8k tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pikv.kv import bitslice, kernels
from pikv.kv.attention import blockwise_attention
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
    """uint8 codes [..., n] (each < 2**bits, n divisible by 8 // bits) -> packed uint8 [..., n * bits / 8],
    planar: byte k holds codes k, k + n*bits/8, k + 2*n*bits/8, ... from the low bits up."""
    per = 8 // bits
    n = codes.shape[-1]
    if 8 % bits or n % per:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into bytes (bits must divide 8, codes a multiple of {per})")
    planes = codes.reshape(*codes.shape[:-1], per, n // per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32)[:, None] * bits
    return (planes << shifts).sum(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., m] -> codes [..., m * 8 / bits]."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32)[:, None] * bits
    return ((packed.to(torch.int32).unsqueeze(-2) >> shifts) & (2 ** bits - 1)).flatten(-2).to(torch.uint8)


_UNITS = (torch.int64, torch.int32, torch.int16, torch.uint8)


class Unpacker:
    """Unpacks blocks of planar-packed codes into fp32 planes, reusing two scratch buffers (the
    shifted bytes and the fp32 codes) that grow to the largest block and are then kept (under
    no_grad; with autograd on, every block gets its own)."""

    def __init__(self, bits: int):
        self.bits, self.per = bits, 8 // bits
        self._bytes = self._floats = None
        self._shifts = {}  # (lane dtype, device) -> the planes' bit offsets

    def _scratch(self, name: str, numel: int, like: torch.Tensor, dtype) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd may save a block's codes for backward: never overwrite them
            return torch.empty(numel, dtype=dtype, device=like.device)
        buf = getattr(self, name)
        if buf is None or buf.numel() < numel or buf.device != like.device:
            buf = torch.empty(numel, dtype=dtype, device=like.device)
            setattr(self, name, buf)
        return buf[:numel]

    def planes(self, packed: torch.Tensor) -> torch.Tensor:
        """packed uint8 [..., F] (rows of `pack`; F a multiple of the row's bytes) -> fp32 [per, ..., F]:
        plane i, byte k holds the code k + i * (row bytes) of byte k's row."""
        bits, per, F = self.bits, self.per, packed.shape[-1]
        unit = next(u for u in _UNITS if F % u.itemsize == 0)  # the widest lane whose views stay aligned
        lanes = packed.view(unit)
        key = (unit, packed.device)
        if key not in self._shifts:
            self._shifts[key] = torch.arange(0, 8, bits, dtype=unit, device=packed.device)
        shifts = self._shifts[key].view(per, *[1] * lanes.dim())
        shifted = self._scratch("_bytes", per * packed.numel(), packed, torch.uint8).view(unit).view(per, *lanes.shape)
        torch.bitwise_right_shift(lanes.unsqueeze(0), shifts, out=shifted)
        shifted.bitwise_and_(int.from_bytes(bytes([2 ** bits - 1]) * unit.itemsize, "little"))
        out = self._scratch("_floats", per * packed.numel(), packed, torch.float32).view(per, *packed.shape)
        return out.copy_(shifted.view(torch.uint8).view(per, *packed.shape))


def _add_contiguous(x_permuted, y):
    """x + y in a contiguous tensor of x's logical order (an elementwise result keeps a permuted
    input's memory order, so the reshape after it would copy again). No out= (autograd)."""
    return x_permuted.contiguous().add_(y)


def _token_scores(q_BGMD, codes, scale_BGKn, zero_BGKn):
    """Scores of keys quantized per token over n groups of channels, without dequantizing:
    q . k_t = sum_n scale_tn (q_n . code_tn) + sum_n zero_tn sum(q_n). codes: fp32 planes
    [per, B, G, K, n, row bytes]; returns [B, G, M, K]."""
    per, B, G, K, n, rb = codes.shape
    M = q_BGMD.shape[2]
    q_planes = q_BGMD.view(B, G, M, n, per, rb).permute(4, 0, 1, 3, 5, 2)  # [per, B, G, n, rb, M]
    dots = codes[0].transpose(2, 3) @ q_planes[0]  # [B, G, n, K, M]
    for i in range(1, per):
        dots += codes[i].transpose(2, 3) @ q_planes[i]
    s_BGKM = (dots * scale_BGKn.float().permute(0, 1, 3, 2)[..., None]).sum(2)
    q_sum_BGMn = q_BGMD.view(B, G, M, n, -1).sum(-1)
    return torch.baddbmm(s_BGKM.transpose(-1, -2).reshape(B * G, M, K), q_sum_BGMn.reshape(B * G, M, n),
                         zero_BGKn.float().transpose(-1, -2).reshape(B * G, n, K)).view(B, G, M, K)


def _token_values(p_BGMK, codes, scale_BGKn, zero_BGKn):
    """Weights x values quantized per token over n groups of channels, without dequantizing:
    sum_t p_t v_t = sum_t (p_t scale_tn) code_t + sum_t p_t zero_tn per group n. codes: fp32 planes
    [per, B, G, K, n, row bytes]; returns [B, G, M, D]."""
    per, B, G, K, n, rb = codes.shape
    M = p_BGMK.shape[2]
    p_scaled = p_BGMK[:, :, None] * scale_BGKn.float().permute(0, 1, 3, 2)[:, :, :, None]  # [B, G, n, M, K]
    o = torch.stack([p_scaled @ codes[i].transpose(2, 3) for i in range(per)])  # [per, B, G, n, M, rb]
    o = o.permute(1, 2, 4, 3, 0, 5)  # [B, G, M, n, per, rb]: channel n * group + i * rb + j
    zero_BGMn = p_BGMK @ zero_BGKn.float()
    return _add_contiguous(o, zero_BGMn[..., None, None]).view(B, G, M, n * per * rb)


def _exact_block(lo, hi, k_BGKD, v_BGKD):
    """A block of exactly stored keys/values (KIVI's fp16 residual), attended in fp32."""
    return (lo, hi, lambda q: q @ k_BGKD.float().transpose(-1, -2), lambda p: p @ v_BGKD.float())


class _QuantAttention(Store):
    """Attention over a quantized store in its compressed domain, or, with compressed_attention
    False, by the base class: dequantize everything, then attend (the reference). A subclass's
    `_blocks()` yields (lo, hi, scores(q_BGMD), values(p_BGMK)) over its stored tokens in order."""
    compressed_attention = True
    fused_kernel = True  # decode steps on the CPU through pikv/kv/kernels (False: the torch blocks)
    fused_simd = True  # the kernel's AVX-512 build (False: its portable build, a benchmark baseline)
    block_codes = 1 << 19  # codes of one tensor unpacked at a time (see the module docstring)

    def attend(self, q_BNTD, read, pos, start, T, extra, need_probs):
        if not self.compressed_attention:
            return super().attend(q_BNTD, read, pos, start, T, extra, need_probs)
        mask = self.read_mask(q_BNTD.device, pos, start, T, extra, None)  # one key per stored token
        op = kernels.decode_op(q_BNTD, self.fused_kernel, self.fused_simd) if T == 1 else None
        if op is not None:
            return self._attend_fused(op, q_BNTD, mask, need_probs)
        G = next(iter(self.buf.t.values())).shape[1]
        return blockwise_attention(q_BNTD, G, self._blocks(), mask, need_probs)

    def _attend_fused(self, op, q_BN1D, mask, need_probs):
        """One decode step through the fused kernel (pikv/kv/kernels/quant_decode.cpp): the same
        folded-scale sums as `_blocks`, one pass over the packed bytes in C++."""
        B, N, _, D = q_BN1D.shape
        channel_keys, keys, values, k_exact, v_exact = self._kernel_inputs(B, D, q_BN1D.device)
        G, S = values[1].shape[1], values[1].shape[2] + k_exact.shape[2]  # from the scales [B, G, tokens, n]
        keep = torch.empty(0, dtype=torch.bool)
        if mask is not None:  # [1, S] or [B', H', 1, S] (H' in 1, G)
            keep = (mask.view(1, 1, S) if mask.dim() == 2 else mask[:, :, 0]).expand(B, G, S)
        o_BND, p_BNS = op(q_BN1D.reshape(B, N, D).float().contiguous(), 1 / math.sqrt(D), channel_keys, *keys,
                          *values, k_exact, v_exact, keep, need_probs)
        return o_BND.view(B, N, 1, D).to(q_BN1D.dtype), p_BNS.view(B, N, 1, S) if need_probs else None

    @staticmethod
    def _token_codes(buf: Buffers, prefix: str, D: int, n: Optional[int] = None, slices: Optional[list] = None):
        """(codes, scale, zero, bits, channels per group) of the first n (default: all) tokens'
        per-token codes, read off their shapes; codes and bits are lists over the bit slices, top first
        (`slices`: their buffers, pikv/kv/bitslice.py; default the unsliced codes `{prefix}c`)."""
        codes = [buf.view(name)[:, :, :n] for name in slices or [prefix + "c"]]
        scale, zero = (buf.view(prefix + x)[:, :, :n] for x in "sz")
        return codes, scale, zero, [8 * c.shape[-1] // D for c in codes], D // scale.shape[-1]

    def _token_block(self, prefix: str, buf: Buffers, lo: int, hi: int, unpacker: Unpacker, codes_name=None):
        """Planes of the per-token codes of tokens lo..hi-1 [per, B, G, K, n, row bytes], scale, zero [B, G, K, n]
        (codes_name: one bit slice's buffer, default the codes `{prefix}c`)."""
        codes = buf.view(codes_name or prefix + "c")[:, :, lo:hi]
        scale, zero = buf.view(prefix + "s")[:, :, lo:hi], buf.view(prefix + "z")[:, :, lo:hi]
        planes = unpacker.planes(codes)
        return planes.view(*planes.shape[:4], scale.shape[-1], -1), scale, zero


class TokenQuantStore(_QuantAttention):
    """Quantized storage that any selection may evict from: keys and values both quantized per
    token (min-max over groups of `group` channels, codes packed), as soon as they are appended, so
    every stored token stands alone. KIVI's per-channel key groups span `group` consecutive tokens,
    which an eviction would break (KiviStore: selections that free nothing).

    The tokens of a step are attended exactly in that step and through their codes afterwards, as
    KIVI's residual and HF's QuantizedCache hold the newest tokens at full precision: a prefill
    reads its own prompt exactly, so the keys and values of every later layer are computed from
    exact attention, and a decode step reads its own token exactly. The exact copy is this step's
    input, dropped at `settle`: no stored byte. Measured on SmolLM2-135M's development windows
    (docs/benchmarks.md, "Rotated quantization"): 4-bit rotated keys and values alone +5.52% -> +2.84%."""

    def __init__(self, bits: int, group: int, dtype=None, chunk: int = 256, capacity: int = 0,
                 value_bits: Optional[int] = None):
        super().__init__(dtype, chunk, capacity)
        self.bits, self.group = bits, group  # bits: the keys' (and the values' unless value_bits)
        self.value_bits = value_bits or bits
        # per tensor: (buffer name, unpacker, shift) of each bit slice, top first (pikv/kv/bitslice.py)
        self.parts = {name: [(buf, Unpacker(w), shift) for buf, (w, shift) in zip(bitslice.names(name, b), bitslice.slices(b))]
                      for name, b in (("k", bits), ("v", self.value_bits))}

        self._new = None  # this step's keys and values in the codes' space, fp32 (the class docstring)

    def _space(self, x_D: torch.Tensor) -> torch.Tensor:
        """Keys / values in the space their codes are made in, fp32 (RotatedQuantStore: rotated)."""
        return x_D.float()

    def append(self, k_pre_BGTD, k_BGTD, v_BGTD, at=None):
        k, v = self._space(k_BGTD), self._space(v_BGTD)
        out = {}
        for name, x, bits in (("k", k, self.bits), ("v", v, self.value_bits)):
            B, G, T, D = x.shape
            gc = min(self.group, D)
            codes, scale, zero = quantize(x.view(B, G, T, D // gc, gc), bits, dim=-1)
            for (buf, _, _), (width, _), part in zip(self.parts[name], bitslice.slices(bits), bitslice.split(codes, bits)):
                out[buf] = pack(part, width).view(B, G, T, -1)
            out.update({f"{name}s": scale[..., 0], f"{name}z": zero[..., 0]})
        self.buf.write(out, at)
        # the kernel reads rows of D: standard strides (contiguous() keeps a size-1 dim's odd stride)
        self._new = tuple(x.reshape(-1).view(x.shape) for x in (k, v))

    def settle(self):
        self._new = None

    def _coded(self) -> int:
        """Stored tokens read through their codes this step: all but the step's new ones."""
        return self.buf.n - (self._new[0].shape[2] if self._new is not None else 0)

    def read(self, dtype, rope, pos, start, T):
        return self._read("k", dtype), self._read("v", dtype), None

    def _read(self, name: str, dtype) -> torch.Tensor:
        """Keys or values [B, G, S, D] in the codes' space as this step reads them: dequantized, then
        the step's new tokens exactly."""
        n = self._coded()
        scale, zero = self.buf.view(f"{name}s")[:, :, :n], self.buf.view(f"{name}z")[:, :, :n]
        B, G, _, n_groups = scale.shape
        codes = 0
        for buf, unpacker, shift in self.parts[name]:
            packed = self.buf.view(buf)[:, :, :n]
            codes = codes + (unpack(packed.reshape(B, G, n, n_groups, packed.shape[-1] // n_groups),
                                    unpacker.bits).int() << shift)
        coded = dequantize(codes, scale[..., None], zero[..., None], dtype).flatten(-2)
        if self._new is None:
            return coded
        return torch.cat([coded, self._new[0 if name == "k" else 1].to(dtype)], 2)

    def _kernel_inputs(self, B, D, device):
        n = self._coded()
        k_new, v_new = self._new if self._new is not None else (torch.empty(B, self.buf.view("kc").shape[1], 0, D,
                                                                            device=device),) * 2
        keys, values = [self._token_codes(self.buf, x, D, n, [buf for buf, _, _ in self.parts[x]]) for x in "kv"]
        return False, keys, values, k_new, v_new

    def _blocks(self):
        B, G, _, row = self.buf.view("kc").shape
        S = self._coded()
        step = max(1, self.block_codes // (B * G * row * self.parts["k"][0][1].per))
        for lo in range(0, S, step):
            hi = min(S, lo + step)
            yield (lo, hi, lambda q, lo=lo, hi=hi: self._sliced(_token_scores, q, "k", lo, hi),
                   lambda p, lo=lo, hi=hi: self._sliced(_token_values, p, "v", lo, hi))
        if self._new is not None:
            yield _exact_block(S, self.buf.n, *self._new)

    def _sliced(self, fold, x, name: str, lo: int, hi: int):
        """`fold` (_token_scores / _token_values) of tokens lo..hi-1 summed over the tensor's bit slices:
        each slice's scale times 2^shift, the zero point counted once (on the top slice)."""
        out = None
        for buf, unpacker, shift in self.parts[name]:
            planes, scale, zero = self._token_block(name, self.buf, lo, hi, unpacker, buf)
            scale = scale.float() * 2 ** shift if shift else scale  # unsliced codes: no extra op on the path
            part = fold(x, planes, scale, zero if out is None else torch.zeros_like(zero))
            out = part if out is None else out + part
        return out

    def final_tokens(self):
        return self._coded()  # the new tokens' keys, read exactly now, are read through their codes next step


def _kivi_scores(q_BGMD, planes, scale_BGnD, zero_BGnD):
    """Scores of per-channel quantized keys (n groups of g tokens) without dequantizing: the
    group's scale folded into the query, its zero point one dot product per group. planes: fp32
    [per, B, G, n, D * row bytes] (a row: one channel's g tokens); returns [B, G, M, n * g]."""
    per, B, G, n, _ = planes.shape
    D, M = scale_BGnD.shape[-1], q_BGMD.shape[2]
    q_scaled = q_BGMD[:, :, None] * scale_BGnD.float()[:, :, :, None, :]  # [B, G, n, M, D]
    planes = planes.view(per, B, G, n, D, -1)
    dots = torch.stack([q_scaled @ planes[i] for i in range(per)])  # [per, B, G, n, M, row bytes]
    zero_BGMn = q_BGMD @ zero_BGnD.float().transpose(-1, -2)
    return _add_contiguous(dots.permute(1, 2, 4, 3, 0, 5), zero_BGMn[..., None, None]).view(B, G, M, -1)


class KiviStore(_QuantAttention):
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
        self.unpacker = Unpacker(bits)

    def read(self, dtype, rope, pos, start, T):
        k, v = self.buf.view("k").to(dtype), self.buf.view("v").to(dtype)
        if not self.kblocks.n:
            return k, v, None
        g, bits = self.group, self.bits
        B, G, nblk, _ = self.kblocks.view("kc").shape
        D = k.shape[-1]
        kc = unpack(self.kblocks.view("kc").view(B, G, nblk, D, -1), bits).transpose(3, 4)  # [B,G,nblk,g,D]
        kq = dequantize(kc, self.kblocks.view("ks")[:, :, :, None], self.kblocks.view("kz")[:, :, :, None], dtype)
        gv = min(g, D)
        vc = unpack(self.vtokens.view("vc").view(B, G, nblk * g, D // gv, -1), bits)
        vq = dequantize(vc, self.vtokens.view("vs")[..., None], self.vtokens.view("vz")[..., None], dtype)
        return torch.cat([kq.reshape(B, G, nblk * g, D), k], 2), torch.cat([vq.view(B, G, nblk * g, D), v], 2), None

    def _blocks(self):
        g, un = self.group, self.unpacker
        if self.kblocks.n:
            B, G, n, row = self.kblocks.view("kc").shape
            step = max(1, self.block_codes // (B * G * row * un.per))  # groups per block
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                yield (lo * g, hi * g,
                       lambda q, lo=lo, hi=hi: _kivi_scores(q, un.planes(self.kblocks.view("kc")[:, :, lo:hi]),
                                                            self.kblocks.view("ks")[:, :, lo:hi],
                                                            self.kblocks.view("kz")[:, :, lo:hi]),
                       lambda p, lo=lo, hi=hi: _token_values(p, *self._token_block("v", self.vtokens, lo * g, hi * g, un)))
        S = self.vtokens.n
        if self.buf.n:
            yield _exact_block(S, S + self.buf.n, self.buf.view("k"), self.buf.view("v"))

    def _kernel_inputs(self, B, D, device):
        k_exact, v_exact = self.buf.view("k").float(), self.buf.view("v").float()
        if not self.kblocks.n:  # nothing quantized yet: empty codes
            codes = torch.empty(B, k_exact.shape[1], 0, 1, dtype=torch.uint8, device=device)
            scale = torch.empty(codes.shape, dtype=torch.float16, device=device)
            return True, ([codes], scale, scale, [8], self.group), ([codes], scale, scale, [8], D), k_exact, v_exact
        kc = self.kblocks.view("kc")
        keys = ([kc], self.kblocks.view("ks"), self.kblocks.view("kz"), [8 * kc.shape[-1] // (D * self.group)],
                self.group)
        return True, keys, self._token_codes(self.vtokens, "v", D), k_exact, v_exact

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
            self.kblocks.write({"kc": pack(kc.transpose(3, 4), bits).reshape(B, G, groups, -1),
                                "ks": ks.view(B, G, groups, D), "kz": kz.view(B, G, groups, D)})
            self.vtokens.write({"vc": pack(vc, bits).reshape(B, G, n, -1), "vs": vs.view(B, G, n, -1),
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
