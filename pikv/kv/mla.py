"""The decoupled learned latent's cache with absorbed attention (MLA inference, DeepSeek-V2
arXiv:2405.04434 section 2.1; DeepSeek-V3 `inference/model.py`, attn_impl="absorb").

Shapes: B batch, N query heads, G kv heads, T new tokens, S stored tokens (codes of the tokens
that left the window, then this step's E = window + new tokens), E exact tokens, K keys read
(S + E with a window, else S), M = N/G * T query rows of one kv head, D head dim, P rotated dims
per head, r latent rank.

With partial rotary (model.rotary_fraction < 1) the compressor (rotary_dims = P) encodes only the
position-free key dims and the values; the P rotated key dims of each kv head are stored apart
after RoPE (int8 codes + one fp16 scale per token with kv.latent_bits=8, else the store dtype).
A decode step then never rebuilds a stored token's key or value. Per kv head g, with Uk_g / Uv_g
the rows of the up-projection that produce g's key dims P.. / values:

    scores = q[:P] . k_rot                      (exact: the stored rotated dims)
           + (q[P:] @ Uk_g) . c                 (the key up-projection absorbed into the query)
    out    = (p @ c) @ Uv_g^T                   (the value up-projection applied once per query)
           + p_exact @ v_exact                  (the window's exact tokens, read as the explicit path does)

The latent c is shared by every kv head, so all N query heads score it with one matmul. int8
codes are converted to the compute dtype (the matmuls need it) and their per-token scale
multiplies the scores / probabilities ([N, S] numbers) instead of the codes ([S, r] numbers).
A prefill (T > 1) reconstructs keys and values and runs SDPA (`LatentStore.attend`): absorbed
attention materialises the [N*T, K] scores that SDPA's fused kernel avoids.
"""

from __future__ import annotations

import math

import torch

from pikv.kv.storage import LatentStore


class MLAStore(LatentStore):
    """The decoupled latent (LatentKVCompressor with rotary_dims > 0): codes [B, 1, S, r] (+ scale),
    rotated key dims kr [B, G, S, P] (+ scale [B, 1, S, 1]), the last `window` tokens exact (keys
    after RoPE here: the latent reads only position-free dims, so they need no re-rotation)."""

    def __init__(self, comp, rank: int, dtype, chunk: int = 256, capacity: int = 0):
        if not comp.rot:
            raise ValueError("MLAStore needs a decoupled latent (a compressor with rotary_dims > 0, built for a "
                             "model with model.rotary_fraction < 1); the joint latent's store is LatentStore")
        super().__init__(comp, rank, dtype, chunk, capacity)

    def append(self, k_pre_BGTD, k_BGTD, v_BGTD, at=None):
        k_E, v_E = k_BGTD, v_BGTD
        if self.exact.n:
            k_E = torch.cat([self.exact.view("wk").to(k_BGTD.dtype), k_BGTD], 2)
            v_E = torch.cat([self.exact.view("wv").to(v_BGTD.dtype), v_BGTD], 2)
        dtype = self.dtype or k_BGTD.dtype
        fields = {name: c[:, None] for name, c in self.comp.store(self.comp.encode(k_E, v_E, self.rank), dtype).items()}
        self._E = (k_E, v_E, {**fields, **self.comp.store_rotary(k_E, dtype)})

    def _parts(self) -> list[dict[str, torch.Tensor]]:
        """The stored fields in token order: the buffers' (tokens that left the window), this step's E."""
        E = self._E[2]
        return ([{name: self.buf.view(name) for name in E}] if self.buf.n else []) + [E]

    def _rotary(self, part: dict[str, torch.Tensor], dtype) -> torch.Tensor:
        kr = part["kr"].to(dtype)
        return kr * part["kr_scale"].to(dtype) if "kr_scale" in part else kr

    def read(self, dtype, rope, pos, start, T):
        """Explicit keys (rotated dims as stored, the rest decoded) and values: prefill and Quest."""
        k_dec, v_lat = self.comp.decode(self._latent(dtype))
        k_rot = torch.cat([self._rotary(part, dtype) for part in self._parts()], 2)
        return self._and_tail(torch.cat([k_rot, k_dec], -1), v_lat, lambda k_E: k_E)

    def attend(self, q_BNTD, read, pos, start, T, extra, need_probs):
        if T > 1 or extra is not None:  # a prefill, or Quest (which reads the explicit keys anyway)
            return super().attend(q_BNTD, read, pos, start, T, extra, need_probs)
        return self.absorbed(q_BNTD, need_probs)

    def _visible_parts(self) -> tuple[list[dict[str, torch.Tensor]], int]:
        """What one new query reads, one key per stored token in stored order: (the code parts read
        through the latent, the number of exact tokens). Every token that left the window is at
        distance >= window; of this step's E tokens the first E - window are, the rest are read
        exactly (the training pass's rule, LatentKVCompressor.attention)."""
        parts = self._parts()
        E = self._E[0].shape[2]
        exact = min(self.tail, E)
        parts[-1] = {name: x[:, :, :E - exact] for name, x in parts[-1].items()}
        return parts, exact

    def absorbed(self, q_BNTD, need_probs: bool):
        """One query per row after every stored token, without rebuilding stored keys/values
        (module docstring): (o_BNTD, probs per stored token [B, N, 1, S] or None), the same as
        `LatentStore.attend` over `read` up to fp rounding."""
        comp, r, P = self.comp, self.rank, self.comp.rot
        B, N, T, D = q_BNTD.shape
        G, dtype = comp.G, q_BNTD.dtype
        M = N // G * T
        q_BGMD = q_BNTD.reshape(B, G, M, D) * (1 / math.sqrt(D))
        q_abs_BXR = (q_BGMD[..., P:] @ comp.up_k_GCR(r).to(dtype)).view(B, G * M, r)
        parts, exact = self._visible_parts()
        codes = [part["c"][:, 0].to(dtype) for part in parts]  # [B, S_part, r]
        scales = [part["c_scale"][:, 0, :, 0].to(dtype)[:, None] if "c_scale" in part else None for part in parts]
        scores = []
        for part, c_BSR, scale_B1S in zip(parts, codes, scales):
            s_BXS = q_abs_BXR @ c_BSR.transpose(1, 2)
            s_BXS = s_BXS * scale_B1S if scale_B1S is not None else s_BXS
            s_rot_BGMS = q_BGMD[..., :P] @ part["kr"].to(dtype).transpose(-1, -2)
            if "kr_scale" in part:
                s_rot_BGMS = s_rot_BGMS * part["kr_scale"][:, :, :, 0].to(dtype)[:, :, None]
            scores.append(s_BXS.view(B, G, M, -1) + s_rot_BGMS)
        k_E, v_E, _ = self._E
        if exact:
            scores.append(q_BGMD @ k_E[:, :, -exact:].to(dtype).transpose(-1, -2))
        p_BGMS = torch.softmax(torch.cat(scores, -1).float(), dim=-1).to(dtype)
        o_BXR, at = 0, 0
        for c_BSR, scale_B1S in zip(codes, scales):
            p_BXS = p_BGMS.view(B, G * M, -1)[..., at:at + c_BSR.shape[1]]  # a strided view: bmm reads it in place
            o_BXR = o_BXR + (p_BXS * scale_B1S if scale_B1S is not None else p_BXS) @ c_BSR
            at += c_BSR.shape[1]
        o_BGMD = o_BXR.view(B, G, M, r) @ comp.up_v_GDR(r).to(dtype).transpose(-1, -2)
        if exact:
            o_BGMD = o_BGMD + p_BGMS[..., at:] @ v_E[:, :, -exact:].to(dtype)
        return o_BGMD.view(B, N, T, D), p_BGMS.view(B, N, T, -1) if need_probs else None
