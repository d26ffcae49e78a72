"""SwiGLU experts stacked per expert, run over contiguous per-expert row segments.

Shapes: E experts, H hidden, F expert FFN hidden, N dispatched rows (sorted by expert), M padded
rows. Weights are [E, ...] so an expert-parallel rank owns a slice and the layout maps 1:1 to
Hugging Face Mixtral (w1 = gate proj, w3 = up proj, w2 = down proj; HF stores each transposed).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_ALIGN_BYTES = 16  # grouped GEMM (TMA) needs 16-byte aligned strides and token-group starts
_VERIFIED: dict[tuple, bool] = {}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def swiglu_loop(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH) -> torch.Tensor:
    """Reference path: one matmul chain per expert (never per token). Rows past sum(counts) -> 0."""
    # .tolist() syncs the host with the GPU; acceptable in this fallback (torchtitan does the same).
    counts = counts_E.tolist()
    total = sum(counts)
    ys = []
    # unbind, not w[e]: the backward of E separate selects materialises E full-size [E, ...]
    # zero tensors per weight (O(E^2) memory traffic, 80% of the step at E=32); unbind's
    # backward is a single stack.
    experts = zip(w1_EHF.unbind(0), w3_EHF.unbind(0), w2_EFH.unbind(0))
    for seg_XH, (w1_HF, w3_HF, w2_FH) in zip(torch.split(x_NH[:total], counts), experts):
        h_XF = F.silu(seg_XH @ w1_HF) * (seg_XH @ w3_HF)
        ys.append(h_XF @ w2_FH)
    if total < x_NH.shape[0]:
        ys.append(ys[0].new_zeros(x_NH.shape[0] - total, x_NH.shape[1]))
    return torch.cat(ys)


def swiglu_grouped(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH, dtype: torch.dtype) -> torch.Tensor:
    """torch._grouped_mm path: 3 grouped GEMMs, no host sync, no Python loop over experts.

    Each expert's segment is padded to a multiple of 16 bytes of rows (8 for bf16): in the
    backward grad_w = x^T @ grad_y the token dim is contracted per group and every group must
    start 16-byte aligned (torchtitan TOKEN_GROUP_ALIGN_SIZE_M). Rows past sum(counts) -> 0.
    """
    N, H = x_NH.shape
    E = counts_E.shape[0]
    align = max(1, _ALIGN_BYTES // dtype.itemsize)
    counts_E = counts_E.to(torch.int64)
    ends_E = counts_E.cumsum(0)
    starts_E = ends_E - counts_E
    pad_ends_E = ((counts_E + align - 1) // align * align).cumsum(0)
    pad_starts_E = pad_ends_E - (counts_E + align - 1) // align * align
    rows_N = torch.arange(N, device=x_NH.device)
    expert_N = torch.searchsorted(ends_E, rows_N, right=True)  # E for rows past the last segment
    valid_N = expert_N < E
    e_N = expert_N.clamp(max=E - 1)
    # Row i of expert e goes to pad_starts[e] + (i - starts[e]); tail rows after all segments.
    dest_N = torch.where(valid_N, pad_starts_E[e_N] + rows_N - starts_E[e_N],
                         pad_ends_E[-1] + rows_N - ends_E[-1])
    M = N + E * (align - 1)
    # `where` (not a multiply) masks tail rows both ways: grouped_mm leaves rows past offs[-1]
    # unwritten, and neither their values nor their gradients may leak into x or y.
    x_NH = torch.where(valid_N.unsqueeze(-1), x_NH, 0).to(dtype)
    x_MH = x_NH.new_zeros(M, H).index_copy(0, dest_N, x_NH)
    offs_E = pad_ends_E.to(torch.int32)
    w1, w3, w2 = (w.to(dtype) for w in (w1_EHF, w3_EHF, w2_EFH))
    h_MF = F.silu(torch._grouped_mm(x_MH, w1, offs=offs_E)) * torch._grouped_mm(x_MH, w3, offs=offs_E)
    y_MH = torch._grouped_mm(h_MF, w2, offs=offs_E)
    y_NH = y_MH.index_select(0, dest_N)
    return torch.where(valid_N.unsqueeze(-1), y_NH, 0)


def grouped_mm_verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Run torch._grouped_mm once per (device, dtype) on a small problem with an empty expert,
    unaligned segments and dropped tail rows; use it only if forward and gradients match the loop."""
    key = (device.type, device.index, dtype)
    if key not in _VERIFIED:
        _VERIFIED[key] = _probe(device, dtype)
    return _VERIFIED[key]


@torch.compiler.disable
def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    E, H, Fh = 4, 16, 32
    counts_E = torch.tensor([5, 0, 11, 3], device=device)
    tensors = [torch.randn(23, H, generator=gen), torch.randn(E, H, Fh, generator=gen) / 4,
               torch.randn(E, H, Fh, generator=gen) / 4, torch.randn(E, Fh, H, generator=gen) / 6]
    grad_NH = torch.randn(23, H, generator=gen).to(device, dtype)
    outs = []
    try:
        with torch.autocast(device_type=device.type, enabled=False), torch.enable_grad():
            for fn in ("grouped", "loop"):
                args = [t.to(device, dtype).requires_grad_() for t in tensors]
                y = (swiglu_grouped(*args[:1], counts_E, *args[1:], dtype) if fn == "grouped"
                     else swiglu_loop(args[0], counts_E, *args[1:]))
                y.backward(grad_NH)
                outs.append([y.float()] + [a.grad.float() for a in args])
    except Exception as err:  # unsupported GPU / build: fall back to the loop
        warnings.warn(f"torch._grouped_mm unusable on {device} {dtype} ({err}); using the expert loop")
        return False
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    ok = all(torch.allclose(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
             for a, b in zip(*outs))
    if not ok:
        warnings.warn(f"torch._grouped_mm disagrees with the expert loop on {device} {dtype}; using the loop")
    return ok


class GroupedExperts(nn.Module):
    """E SwiGLU experts y = w2(silu(x w1) * (x w3)) with weights stacked as [E, ...].

    `use_grouped_mm`: None (auto) uses torch._grouped_mm on CUDA when the compute dtype is bf16,
    H and F are 16-byte aligned and a one-time probe matched the loop; True forces it (tests);
    False forces the per-expert loop.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w3_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w2_EFH = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.use_grouped_mm: Optional[bool] = None
        self.reset_parameters()

    def reset_parameters(self, std: Optional[float] = None, out_std: Optional[float] = None) -> None:
        """normal(0, std) inputs, normal(0, out_std) down proj; None = 1/sqrt(H) (fan-in scale)."""
        std_in = std if std is not None else 1 / math.sqrt(self.w1_EHF.shape[1])
        nn.init.normal_(self.w1_EHF, std=std_in)
        nn.init.normal_(self.w3_EHF, std=std_in)
        nn.init.normal_(self.w2_EFH, std=out_std if out_std is not None else std_in)

    def _grouped(self, x_NH: torch.Tensor, dtype: torch.dtype) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        H, Fh = self.w1_EHF.shape[1:]
        return (x_NH.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                and H % 8 == 0 and Fh % 8 == 0 and grouped_mm_verified(x_NH.device, dtype))

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_NH: rows sorted by expert, counts_E: rows per expert -> y_NH (rows past sum(counts) = 0)."""
        dtype = _compute_dtype(x_NH)
        if self._grouped(x_NH, dtype):
            return swiglu_grouped(x_NH, counts_E, self.w1_EHF, self.w3_EHF, self.w2_EFH, dtype)
        return swiglu_loop(x_NH, counts_E, self.w1_EHF, self.w3_EHF, self.w2_EFH)
