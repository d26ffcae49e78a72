"""The decoupled learned latent's cache with absorbed attention (MLA inference, DeepSeek-V2
arXiv:2405.04434 section 2.1; DeepSeek-V3 `inference/model.py`, attn_impl="absorb").

Shapes: B batch, N query heads, G kv heads, T new tokens, S stored tokens (S0 in the buffers:
the tokens that left the window; then this step's E = window + new tokens), M = N/G * T query rows
of one kv head, D head dim, P rotated dims per head, r latent rank.

With partial rotary (model.rotary_fraction < 1) the compressor (rotary_dims = P) encodes only the
position-free key dims and the values; the P rotated key dims of each kv head are stored apart
after RoPE (int8 codes + one fp16 scale per token with codes of <= 8 bits, else the store dtype).
A decode step then never rebuilds a stored token's key or value. Per kv head g, with Uk_g / Uv_g
the rows of the up-projection that produce g's key dims P.. / values:

    scores = q[:P] . k_rot                      (exact: the stored rotated dims)
           + (q[P:] @ Uk_g) . c                 (the key up-projection absorbed into the query)
    out    = (p @ c) @ Uv_g^T                   (the value up-projection applied once per query)
           + p_new @ v_new                      (this step's E newest tokens, explicitly: the window
                                                 exact, the token leaving it decoded from its codes)

The latent c is shared by every kv head, so all N query heads score it with one matmul. int8
codes are converted to the compute dtype (the matmuls need it) and their per-token scale
multiplies the scores / probabilities ([N, S] numbers) instead of the codes ([S, r] numbers); int4
codes (a scale per group of coordinates) are dequantized to the [S, r] latent first.
A prefill (T > 1) reconstructs keys and values and runs SDPA (`LatentStore.attend`): absorbed
attention materialises the [N*T, K] scores that SDPA's fused kernel avoids.

With int8 codes (the default) a decode step on the CPU is one fused C++ op
(pikv/kv/kernels/mla_decode.cpp, `_absorbed_fused`): it reads the int8 codes and rotated dims in
place (no fp32 copy of the cache), this step's tokens that left the window through their codes
(nothing decoded), scores, softmaxes with the exact window, sums p c_scale c into the [M, r] latent
output and applies Uv, all in one call. `fused_kernel = False` (the benchmark's `--torch-path`),
other code widths, CUDA tensors and autograd keep the torch path below; the sharded latent
(pikv/kv/sharded_latent.py) calls `absorbed_scores` / `absorbed_values` for its log-sum-exp merge.
"""

from __future__ import annotations

import math

import torch

from pikv.kv import kernels
from pikv.kv.storage import LatentStore


class MLAStore(LatentStore):
    """The decoupled latent (LatentKVCompressor with rotary_dims > 0): codes [B, 1, S, r] (+ scale),
    rotated key dims kr [B, G, S, P] (+ scale [B, 1, S, 1]), the last `window` tokens exact (keys
    after RoPE here: the latent reads only position-free dims, so they need no re-rotation)."""
    fused_kernel = True  # int8 decode steps on the CPU through pikv/kv/kernels (False: the torch path)
    fused_simd = True  # the kernel's AVX-512 build (False: its portable build, a benchmark baseline)

    def __init__(self, comp, rank: int, dtype, chunk: int = 256, capacity: int = 0, fmt=None):
        if not comp.rot:
            raise ValueError("MLAStore needs a decoupled latent (a compressor with rotary_dims > 0, built for a "
                             "model with model.rotary_fraction < 1); the joint latent's store is LatentStore")
        super().__init__(comp, rank, dtype, chunk, capacity, fmt)

    def append(self, k_pre_BGTD, k_BGTD, v_BGTD, at=None):
        k_E, v_E = k_BGTD, v_BGTD
        if self.exact.n:
            k_E = torch.cat([self.exact.view("wk").to(k_BGTD.dtype), k_BGTD], 2)
            v_E = torch.cat([self.exact.view("wv").to(v_BGTD.dtype), v_BGTD], 2)
        dtype = self.dtype or k_BGTD.dtype
        fields = {name: c[:, None] for name, c in self.fmt.store(self.comp.encode(k_E, v_E, self.rank), dtype).items()}
        self._E = (k_E, v_E, {**fields, **self.fmt.store_rotary(k_E[..., :self.comp.rot], dtype)})
        self._step = {}  # what both the scores and the values read, computed once per step (append starts one)

    def _parts(self) -> list[dict[str, torch.Tensor]]:
        """The stored fields in token order: the buffers' (tokens that left the window), this step's E."""
        E = self._E[2]
        return ([{name: self.buf.view(name) for name in E}] if self.buf.n else []) + [E]

    def _rotary(self, part: dict[str, torch.Tensor], dtype) -> torch.Tensor:
        kr = part["kr"].to(dtype)
        return kr * part["kr_scale"].to(dtype) if "kr_scale" in part else kr

    def _decoded(self, part: dict[str, torch.Tensor], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit (keys after RoPE, values) [B, G, S_part, D] of one part's stored fields."""
        k_dec, v = self.comp.decode(self.fmt.load({name: part[name][:, 0] for name in ("c", "c_scale")
                                                   if name in part}, dtype, self.rank))
        return torch.cat([self._rotary(part, dtype), k_dec], -1), v

    def read(self, dtype, rope, pos, start, T):
        """Explicit keys (rotated dims as stored, the rest decoded) and values: prefill and Quest."""
        keys, values = zip(*(self._decoded(part, dtype) for part in self._parts()))
        return self._and_tail(torch.cat(keys, 2), torch.cat(values, 2), lambda k_E: k_E)

    def attend(self, q_BNTD, read, pos, start, T, extra, need_probs):
        if T > 1 or extra is not None:  # a prefill, or Quest (which reads the explicit keys anyway)
            return super().attend(q_BNTD, read, pos, start, T, extra, need_probs)
        return self.absorbed(q_BNTD, need_probs)

    def _once(self, name: str, dtype, compute):
        key = (name, dtype)
        if key not in self._step:
            self._step[key] = compute(dtype)
        return self._step[key]

    def _newest(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._once("newest", dtype, self._newest_now)

    def _newest_now(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's E tokens as its one new query reads them, explicitly: (keys, values)
        [B, G, E, D]. The first E - window are at distance >= window, read through the latent
        (the training pass's rule, LatentKVCompressor.attention): decoded here, one token per step
        once the window is full; the rest exactly."""
        k_E, v_E, fields = self._E
        E = k_E.shape[2]
        first = E - min(self.tail, E)
        k_lat, v_lat = self._decoded({name: x[:, :, :first] for name, x in fields.items()}, dtype)
        return torch.cat([k_lat, k_E[:, :, first:].to(dtype)], 2), torch.cat([v_lat, v_E[:, :, first:].to(dtype)], 2)

    def absorbed(self, q_BNTD, need_probs: bool):
        """One query per row after every stored token, without rebuilding the stored tokens'
        keys/values (module docstring): one key per stored token in stored order, so no mask, and
        the probabilities are per stored token. Returns (o_BNTD, probs [B, N, 1, S] or None), the
        same as `LatentStore.attend` over `read` up to fp rounding."""
        B, N, T, D = q_BNTD.shape
        if self.fmt.bits == 8 and T == 1:
            op = kernels.decode_op(q_BNTD, self.fused_kernel, self.fused_simd, "mla_decode")
            if op is not None:
                return self._absorbed_fused(op, q_BNTD, need_probs)
        s_BGMS = self.absorbed_scores(q_BNTD)
        p_BGMS = torch.softmax(s_BGMS.float(), dim=-1).to(q_BNTD.dtype)
        return self.absorbed_values(p_BGMS).view(B, N, T, D), p_BGMS.view(B, N, T, -1) if need_probs else None

    def _absorbed_fused(self, op, q_BNTD, need_probs: bool):
        """`absorbed` through the fused op: the same sums in fp32, read straight from the int8
        buffers (views of the capacity buffers) and this step's codes; the tokens that left the
        window are read through their codes (no decoded copy), the window's exactly."""
        r, P = self.rank, self.comp.rot
        B, N, T, D = q_BNTD.shape
        G, f32 = self.comp.G, torch.float32
        k_E, v_E, fields = self._E
        first = k_E.shape[2] - min(self.tail, k_E.shape[2])  # this step's tokens read through the latent
        stored = self._fields_of(self.buf.view if self.buf.n else None, B, G, r, P, q_BNTD.device)
        leaving = self._fields_of(lambda name: fields[name][:, :, :first], B, G, r, P, q_BNTD.device)
        exact = [self._rows_contiguous(x[:, :, first:].to(f32)) for x in (k_E, v_E)]
        o_BGMD, p_BGMK = op(q_BNTD.reshape(B, G, N // G * T, D).to(f32).contiguous(), self.comp.up.weight.to(f32), r,
                            *stored, *leaving, *exact, need_probs)
        dtype = q_BNTD.dtype
        return o_BGMD.view(B, N, T, D).to(dtype), p_BGMK.view(B, N, T, -1).to(dtype) if need_probs else None

    @staticmethod
    def _rows_contiguous(x_BGXD):
        """x itself when its token rows are contiguous (a slice of the step's keys: no copy), else a copy."""
        return x_BGXD if x_BGXD.stride(-1) == 1 and (x_BGXD.shape[2] <= 1 or x_BGXD.stride(2) == x_BGXD.shape[3]) \
            else x_BGXD.contiguous()

    @staticmethod
    def _fields_of(view, B, G, r, P, device):
        """(c [B, S, r], c_scale [B, S], kr [B, G, S, P], kr_scale [B, S]) of stored int8 fields
        (view(name) -> [B, H, S, .]), or empty ones (view None)."""
        if view is None:
            empty = torch.empty(B, 0, dtype=torch.half, device=device)
            return (torch.empty(B, 0, r, dtype=torch.int8, device=device), empty,
                    torch.empty(B, G, 0, P, dtype=torch.int8, device=device), empty)
        return view("c")[:, 0], view("c_scale")[:, 0, :, 0], view("kr"), view("kr_scale")[:, 0, :, 0]

    def _codes(self, dtype):
        return self._once("codes", dtype, self._codes_now)

    def _codes_now(self, dtype):
        """The codes of the tokens that left the window [B, S0, r] and their per-token scale [B, 1, S0]
        (int8; None otherwise). int4 codes have a scale per group of coordinates, which no per-token
        factor can stand for: they are dequantized first (the attention then reads the [S0, r] latent)."""
        if self.fmt.bits == 4:
            return self.fmt.load({name: self.buf.view(name)[:, 0] for name in ("c", "c_scale")}, dtype, self.rank), None
        c_BSR = self.buf.view("c")[:, 0].to(dtype)
        return c_BSR, self.buf.view("c_scale")[:, :, :, 0].to(dtype) if self.fmt.bits == 8 else None

    def absorbed_scores(self, q_BNTD) -> torch.Tensor:
        """Scaled logits [B, G, M, S0 + E] of the queries (one kv head's N/G heads as M rows): the
        codes' (the key up-projection absorbed into the query), then this step's E newest tokens'.
        Split from the softmax so a sharded cache can take the log-sum-exp of its share."""
        comp, r, P, S0 = self.comp, self.rank, self.comp.rot, self.buf.n
        B, N, T, D = q_BNTD.shape
        G, dtype = comp.G, q_BNTD.dtype
        M = N // G * T
        q_BGMD = q_BNTD.reshape(B, G, M, D) * (1 / math.sqrt(D))
        scores = [q_BGMD @ self._newest(dtype)[0].transpose(-1, -2)]
        if S0:  # the tokens that left the window: codes [B, S0, r] and rotated dims [B, G, S0, P]
            c_BSR, scale_B1S = self._codes(dtype)
            kr_BGSP = self.buf.view("kr").to(dtype)
            q_abs_BXR = (q_BGMD[..., P:] @ comp.up_k_GCR(r).to(dtype)).view(B, G * M, r)
            s_BXS = q_abs_BXR @ c_BSR.transpose(1, 2)
            s_rot_BGMS = q_BGMD[..., :P] @ kr_BGSP.transpose(-1, -2)
            if scale_B1S is not None:
                s_BXS = s_BXS * scale_B1S
            if "kr_scale" in self.buf:  # int8 rotated dims (codes <= 8 bits): one scale per token
                s_rot_BGMS = s_rot_BGMS * self.buf.view("kr_scale")[:, :, :, 0].to(dtype)[:, :, None]
            scores.insert(0, s_BXS.view(B, G, M, S0) + s_rot_BGMS)
        return torch.cat(scores, -1)

    def absorbed_values(self, p_BGMS: torch.Tensor) -> torch.Tensor:
        """sum_j p_j v_j [B, G, M, D] for weights p over `absorbed_scores`' keys (the value
        up-projection applied once per query row)."""
        comp, r, S0 = self.comp, self.rank, self.buf.n
        B, G, M, _ = p_BGMS.shape
        dtype = p_BGMS.dtype
        o_BGMD = p_BGMS[..., S0:] @ self._newest(dtype)[1]
        if S0:
            c_BSR, scale_B1S = self._codes(dtype)
            p_BXS = p_BGMS.reshape(B, G * M, -1)[..., :S0]  # a strided view: bmm reads it in place
            o_BXR = (p_BXS * scale_B1S if scale_B1S is not None else p_BXS) @ c_BSR
            o_BGMD = o_BGMD + o_BXR.view(B, G, M, r) @ comp.up_v_GDR(r).to(dtype).transpose(-1, -2)
        return o_BGMD
