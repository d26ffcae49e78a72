"""Helpers shared by the test suites: the fp32 tolerances with their reasons, seeded inputs, and
the forward/backward probe and randomised layer of the expert-parallel parity tests.

The end-to-end helpers (running train/main.py, reading metrics.jsonl) live in
tests/integration/conftest.py beside the fixtures that use them.
"""

from __future__ import annotations

import torch

from pikv.moe import create_moe

# Two correct fp32 computations that add the same terms in another order (a per-token Python loop
# vs scatter-add, EP shards after all-to-all vs one process, a KV cache vs one pass) differ by a
# few ulps per addition: ~1e-6 on the O(1) values of these small layers. 1e-5 is 10x that and
# still far below any real bug (a wrong expert, token or weight moves values by O(0.1)).
REORDERED_FP32 = dict(atol=1e-5, rtol=1e-5)
# A scalar loss over a handful of terms (the aux loss: E products of global fractions), or its
# gradient, reduced in another order or all-reduced across ranks: within a few ulps (1.2e-7).
REORDERED_FP32_SCALAR = dict(atol=1e-6, rtol=1e-6)
# Same inputs, same code, same order: bit for bit.
EXACT = dict(atol=0, rtol=0)


def seeded(seed: int) -> torch.Generator:
    """A private generator: the numbers it draws depend on `seed` only, not on what ran before."""
    return torch.Generator().manual_seed(seed)


def random_moe(kind: str, hidden: int, experts: int, top_k: int, ffn: int, std: float = 0.3,
               **options) -> torch.nn.Module:
    """create_moe(kind, ...) with every weight drawn from N(0, std) under seed 0: large enough
    that routing and expert outputs differ clearly between tokens."""
    torch.manual_seed(0)
    layer = create_moe(kind, hidden, experts, top_k, ffn, deterministic=True, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, std)
    return layer


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, *inputs, aux_fn=None):
    """Output, input grad, every parameter grad (zeros where unused) and aux loss of
    (layer(x, *inputs) * grad_out).sum() + aux, where aux = aux_fn(layer, x) or layer.aux_loss."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x, *inputs)
    aux = layer.aux_loss if aux_fn is None else aux_fn(layer, x)
    ((y * grad_out).sum() + aux).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux.detach()
