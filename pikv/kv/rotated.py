"""Rotated quantization (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456; SpinQuant, Liu et al.
2024, arXiv:2405.16406): keys (after RoPE) and values are multiplied by a fixed orthogonal matrix R
before their per-token codes are made, the query by the same R, and the attention output by R^T:

    (q R) . (k R) = q . k        sum_t p_t (v_t R) R^T = sum_t p_t v_t

so attention is unchanged up to the quantization, while a channel outlier (RoPE'd keys carry a few
large channels; KIVI quantizes keys per channel for that reason) is spread over all D channels,
and a per-token min-max scale no longer spends its levels on one channel. R is a normalised
Hadamard matrix with a seeded random sign per row (QuaRot's randomised Hadamard); a head dim that is
not a power of two gets a seeded random orthogonal matrix (QR of a Gaussian) instead.

The rotation sits outside the codes: `_space` rotates before TokenQuantStore quantizes, `attend`
rotates q before and the output after the store's compressed-domain attention, and `read` rotates
the dequantized keys/values back (the reference path and Quest's page bounds see real keys). The
store layout (packed planes, scales, zero points) and the block loop are TokenQuantStore's own.
Cost: two [.., D] x [D, D] matmuls per step on the queries and outputs, none per stored token.

The matrix: one per cache (make_cache builds it once and every layer's store shares it), D x D fp32,
like the SVD bases a fixed constant that does not grow with tokens and is not counted in nbytes()
(docs/kv.md, "Bytes"); the Hadamard form is reproducible from (D, seed) alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from pikv.kv.quant import TokenQuantStore


def rotation_matrix(dim: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal [dim, dim] fp32 matrix: diag(signs) H / sqrt(dim) (H: Sylvester's Hadamard)
    when dim is a power of two, else Q of the QR of a Gaussian; signs / Gaussian from `seed`."""
    if dim < 1:
        raise ValueError(f"rotation dim {dim} must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    if dim & (dim - 1):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()  # signs fixed: QR's own are arbitrary
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (dim, 1), generator=gen).double() * 2 - 1
    return (signs * h / dim ** 0.5).float()


class RotatedQuantStore(TokenQuantStore):
    """TokenQuantStore of rotated keys and values (see the module docstring): any selection may evict
    from it; key and value bits may differ (`value_bits`)."""

    def __init__(self, rotation_DD: torch.Tensor, bits: int, group: int, dtype=None, chunk: int = 256,
                 capacity: int = 0, value_bits: Optional[int] = None):
        super().__init__(bits, group, dtype, chunk, capacity, value_bits)
        self.rotation_DD = rotation_DD
        self._on = {}  # device -> the matrix there (the cache's one, moved once)

    def _R(self, device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.rotation_DD.to(device=device, dtype=torch.float32)
        return self._on[device]

    def _rotate(self, x_D: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x R (or x R^T), in fp32: the codes and the folded scales are fp32 anyway."""
        R = self._R(x_D.device)
        return x_D.float() @ (R.T if transpose else R)

    def _space(self, x_D):
        return self._rotate(x_D)

    def read(self, dtype, rope, pos, start, T):
        k, v, _ = super().read(torch.float32, rope, pos, start, T)
        return self._rotate(k, True).to(dtype), self._rotate(v, True).to(dtype), None

    def attend(self, q_BNTD, read, pos, start, T, extra, need_probs):
        if not self.compressed_attention:  # the reference: `read` gives the keys/values rotated back
            return super().attend(q_BNTD, read, pos, start, T, extra, need_probs)
        o_BNTD, probs = super().attend(self._rotate(q_BNTD), read, pos, start, T, extra, need_probs)
        return self._rotate(o_BNTD, True).to(q_BNTD.dtype), probs
