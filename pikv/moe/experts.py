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


# The per-expert loop is a custom op (torch.library) rather than Python autograd code: the loop
# must read the expert counts back to the host, and an opaque op with static output shapes (N
# rows, whatever the routing) lets torch.compile trace a MoE block without a graph break there.
# It is one autograd node rather than E small graphs: the generic version spends ~20% of a
# fine-grained (E=32) step copying (`cat` of the expert outputs, the `split` and weight `unbind`
# backward copies), while here every matmul writes straight into its slice of the output or of
# the stacked weight gradients (`out=`). The pre-activations a, b are returned for backward
# (2*N*F values, what autograd would save).
@torch.library.custom_op("pikv::swiglu_loop", mutates_args=())
def _swiglu_loop_fwd(x_NH: torch.Tensor, counts_E: torch.Tensor, w1_EHF: torch.Tensor, w3_EHF: torch.Tensor,
                     w2_EFH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, H = x_NH.shape
    F_ = w1_EHF.shape[2]
    counts = counts_E.tolist()  # a host sync on GPU; acceptable in this fallback (torchtitan does the same)
    y_NH = x_NH.new_empty(N, H)
    y_NH[sum(counts):] = 0  # rows past sum(counts) (dropped slots) are 0; the rest is overwritten
    a_NF, b_NF = x_NH.new_empty(N, F_), x_NH.new_empty(N, F_)  # rows past sum(counts): never read
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            torch.mm(x_NH[rows], w1_EHF[e], out=a_NF[rows])
            torch.mm(x_NH[rows], w3_EHF[e], out=b_NF[rows])
            torch.mm(F.silu(a_NF[rows]) * b_NF[rows], w2_EFH[e], out=y_NH[rows])
        start += n
    return y_NH, a_NF, b_NF


@_swiglu_loop_fwd.register_fake
def _(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH):
    N, F_ = x_NH.shape[0], w1_EHF.shape[2]
    return x_NH.new_empty(x_NH.shape), x_NH.new_empty(N, F_), x_NH.new_empty(N, F_)


@torch.library.custom_op("pikv::swiglu_loop_backward", mutates_args=())
def _swiglu_loop_bwd(gy_NH: torch.Tensor, x_NH: torch.Tensor, counts_E: torch.Tensor, w1_EHF: torch.Tensor,
                     w3_EHF: torch.Tensor, w2_EFH: torch.Tensor, a_NF: torch.Tensor,
                     b_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = counts_E.tolist()
    # Every slice is overwritten below except idle experts and dropped rows: zero only those
    # (zero-filling all four gradient buffers cost ~7% of an E=32 step).
    gx_NH = torch.empty_like(x_NH)
    gx_NH[sum(counts):] = 0
    gw1, gw3, gw2 = torch.empty_like(w1_EHF), torch.empty_like(w3_EHF), torch.empty_like(w2_EFH)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            gw1[e], gw3[e], gw2[e] = 0, 0, 0
            continue
        rows = slice(start, start + n)
        x, a, b, gy = x_NH[rows], a_NF[rows], b_NF[rows], gy_NH[rows]
        silu = F.silu(a)
        torch.mm((silu * b).t(), gy, out=gw2[e])
        gh = gy @ w2_EFH[e].t()
        ga = torch.ops.aten.silu_backward(gh * b, a)  # fused gh * b * silu'(a)
        gb = gh.mul_(silu)
        torch.mm(x.t(), ga, out=gw1[e])
        torch.mm(x.t(), gb, out=gw3[e])
        torch.mm(ga, w1_EHF[e].t(), out=gx_NH[rows])
        gx_NH[rows].addmm_(gb, w3_EHF[e].t())
        start += n
    return gx_NH, gw1, gw3, gw2


@_swiglu_loop_bwd.register_fake
def _(gy_NH, x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH, a_NF, b_NF):
    return (torch.empty_like(x_NH), torch.empty_like(w1_EHF), torch.empty_like(w3_EHF),
            torch.empty_like(w2_EFH))


def _swiglu_loop_setup(ctx, inputs, output):
    x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH = inputs
    _, a_NF, b_NF = output
    # Saved for backward only: no (zero-filled) gradients are formed for them.
    ctx.mark_non_differentiable(a_NF, b_NF)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH, a_NF, b_NF)


def _swiglu_loop_backward(ctx, gy_NH, _ga, _gb):
    if gy_NH is None:  # grads are not materialized: the output did not reach the loss
        return None, None, None, None, None
    x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH, a_NF, b_NF = ctx.saved_tensors
    gx_NH, gw1, gw3, gw2 = _swiglu_loop_bwd(gy_NH, x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH, a_NF, b_NF)
    return gx_NH, None, gw1, gw3, gw2


_swiglu_loop_fwd.register_autograd(_swiglu_loop_backward, setup_context=_swiglu_loop_setup)


def swiglu_loop(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH) -> torch.Tensor:
    """Reference path: one matmul chain per expert (never per token). Rows past sum(counts) -> 0."""
    dtype = _compute_dtype(x_NH)
    # Autocast would not reach inside the custom op consistently: cast once, here.
    with torch.autocast(device_type=x_NH.device.type, enabled=False):
        return _swiglu_loop_fwd(x_NH.to(dtype), counts_E, w1_EHF.to(dtype), w3_EHF.to(dtype), w2_EFH.to(dtype))[0]


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


class FeedForward(nn.Module):
    """Dense SwiGLU (Llama MLP names): down(silu(gate(x)) * up(x)). The transformer's dense FFN
    and the MoE layer's shared experts."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_NH: rows sorted by expert, counts_E: rows per expert -> y_NH (rows past sum(counts) = 0)."""
        return run_swiglu(x_NH, counts_E, self.w1_EHF, self.w3_EHF, self.w2_EFH, self.use_grouped_mm)


def run_swiglu(x_NH: torch.Tensor, counts_E: torch.Tensor, w1_EHF: torch.Tensor, w3_EHF: torch.Tensor,
               w2_EFH: torch.Tensor, use_grouped_mm: Optional[bool] = None) -> torch.Tensor:
    """Stacked SwiGLU experts on the fastest verified path (see GroupedExperts.use_grouped_mm);
    shared by GroupedExperts and the LoRA experts (pikv/moe/lora.py)."""
    dtype = _compute_dtype(x_NH)
    grouped = use_grouped_mm
    if grouped is None:
        H, Fh = w1_EHF.shape[1:]
        grouped = (x_NH.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
                   and H % 8 == 0 and Fh % 8 == 0 and grouped_mm_verified(x_NH.device, dtype))
    if grouped:
        return swiglu_grouped(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH, dtype)
    return swiglu_loop(x_NH, counts_E, w1_EHF, w3_EHF, w2_EFH)
