"""The Flex-MoE and Time-MoE layers are exact under expert parallelism, like the base layer
(tests/distributed/test_ep_parity.py): at EP=2 every rank's output, input gradient, gradients
(router, shared expert, this rank's expert slice summed over the EP group) and aux loss equal
the single-process layer on the same weights and tokens. Flex tokens mix full-modality
(G-Router) and partial-modality (S-Router) combinations."""

import pytest
import torch

from pikv.distributed import init_distributed
from pikv.models.parallelize import apply_parallelism
from pikv.moe.losses import load_balancing_loss
from pikv.testing import run_distributed
from tests.helpers import REORDERED_FP32, REORDERED_FP32_SCALAR, forward_backward, random_moe, seeded

H, F, E, K, T, WORLD = 16, 32, 8, 2, 24, 2
EXPERT_PARAMS = ("experts.w1_EHF", "experts.w3_EHF", "experts.w2_EFH")


def _layer(kind):
    return random_moe(kind, H, E, K, F)


def _inputs(world):
    g = seeded(1)
    xs = [torch.randn(T, H, generator=g) for _ in range(world)]
    gs = [torch.randn(T, H, generator=g) for _ in range(world)]
    combos = [torch.randint(0, 7, (T,), generator=g) for _ in range(world)]  # 6 = all modalities
    return xs, gs, combos


def _route(layer, kind, x, combo):
    if kind == "flex":
        layer.router.combo_T = combo
    return layer.router(x)


def _step(layer, kind, x, g, combo, f_E=None):
    def aux_with_global_f(layer, x):  # the reference: this rank's probabilities, global slot fractions
        _, ids, _, probs = _route(layer, kind, x, combo)
        return load_balancing_loss(probs, ids, f_E)
    inputs = (combo,) if kind == "flex" else ()
    return forward_backward(layer, x, g, *inputs, aux_fn=None if f_E is None else aux_with_global_f)


def _worker(rank, world, kind):
    ctx = init_distributed("cpu", "gloo", world)
    layer = apply_parallelism(_layer(kind), ctx)
    xs, gs, combos = _inputs(world)
    return _step(layer, kind, xs[rank], gs[rank], combos[rank])


@pytest.mark.parametrize("kind", ["flex", "time"])
def test_variant_expert_parallel_equals_single_process(kind):
    layer = _layer(kind)
    xs, gs, combos = _inputs(WORLD)
    with torch.no_grad():
        ids = torch.cat([_route(layer, kind, x, c)[1] for x, c in zip(xs, combos)])
    f_E = torch.bincount(ids.flatten(), minlength=E).float() / ids.numel()
    expected = [_step(layer, kind, x, g, c, f_E) for x, g, c in zip(xs, gs, combos)]
    L = E // WORLD
    for rank, (y, xg, grads, aux) in enumerate(run_distributed(_worker, WORLD, kind)):
        ey, exg, egrads, eaux = expected[rank]
        torch.testing.assert_close(y, ey, **REORDERED_FP32)
        torch.testing.assert_close(xg, exg, **REORDERED_FP32)
        torch.testing.assert_close(aux, eaux, **REORDERED_FP32_SCALAR)
        assert set(grads) == set(egrads)
        for name, grad in grads.items():
            ref = egrads[name]
            if name in EXPERT_PARAMS:  # this rank's slice, summed over the EP group
                ref = sum(e[2][name] for e in expected)[rank * L:(rank + 1) * L]
            torch.testing.assert_close(grad, ref, **REORDERED_FP32, msg=lambda m: f"{kind} {name}: {m}")
