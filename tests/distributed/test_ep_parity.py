"""Expert parallelism is exact: at EP=2, EP=4 and DP=2 x EP=2 every rank's output, input
gradient, router gradient, expert gradients and aux loss equal the single-process layer given
the same weights and the same tokens (OLMo-core's parity pattern: reference in the parent,
shards compared in the forked children)."""

import itertools

import pytest
import torch

from pikv.distributed import init_distributed
from pikv.models.parallelize import apply_parallelism
from pikv.moe.losses import load_balancing_loss
from pikv.moe.router import ROUTERS
from pikv.testing import run_distributed
from tests.helpers import REORDERED_FP32, REORDERED_FP32_SCALAR, forward_backward, random_moe, seeded

H, F, E, K, T = 16, 32, 8, 2, 24
CAPACITY = (None, 1.0)
CASES = ("random", "skewed")
EXPERT_PARAMS = ("experts.w1_EHF", "experts.w3_EHF", "experts.w2_EFH")


def _options(router):
    return [(router, cf, case) for cf, case in itertools.product(CAPACITY, CASES)]


ALL = [opt for router in ROUTERS for opt in _options(router)]


def _layer(router, cf):
    return random_moe("base", H, E, K, F, router=router, capacity_factor=cf)


def _inputs(case, world, seed=1):
    g = seeded(seed)
    xs = [torch.randn(T, H, generator=g) for _ in range(world)]
    if case == "skewed":  # every token prefers expert 0, then 1: experts 2..E-1 receive nothing
        xs = [x.abs() + 0.1 for x in xs]
    return xs, [torch.randn(T, H, generator=g) for _ in range(world)]


def _case(router, cf, case, world):
    """The layer (skewed: the gate prefers expert 0, then 1), and every rank's tokens and output grads."""
    layer = _layer(router, cf)
    if case == "skewed":
        with torch.no_grad():
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[0] = 2.0
            layer.router.gate.weight[1] = 1.0
    return (layer, *_inputs(case, world))


def _step(layer, x, grad_out, f_E=None):
    """The layer's own aux loss, or (the reference) this rank's probabilities with global f_E."""
    def aux_with_global_f(layer, x):
        _, expert_ids_TK, _, probs_TE = layer.router(x)
        return load_balancing_loss(probs_TE, expert_ids_TK, f_E)
    return forward_backward(layer, x, grad_out, aux_fn=None if f_E is None else aux_with_global_f)


def _reference(world, ep):
    """Per rank: the expected output, input grad, param grads (experts: this rank's slice summed
    over its EP group) and aux loss, from the single-process layer."""
    expected = {}
    for router, cf, case in ALL:
        layer, xs, gs = _case(router, cf, case, world)
        f_E = None  # expert choice: its aux loss is a constant, computed by the layer itself
        if not layer.router.expert_choice:  # global f_e: every rank routes its own tokens
            with torch.no_grad():
                ids = torch.cat([layer.router(x)[1] for x in xs])
            f_E = torch.bincount(ids.flatten(), minlength=E).float() / ids.numel()
        per_rank = [_step(layer, x, g, f_E) for x, g in zip(xs, gs)]
        L = E // ep
        for rank in range(world):
            y, xg, grads, aux = per_rank[rank]
            group = [r for r in range(world) if r // ep == rank // ep]  # ranks of this EP group
            sl = slice((rank % ep) * L, (rank % ep + 1) * L)
            grads = dict(grads)
            for name in EXPERT_PARAMS:
                grads[name] = sum(per_rank[r][2][name] for r in group)[sl]
            expected[(rank, router, cf, case)] = (y, xg, grads, aux)
    return expected


def _worker(rank, world, ep):
    ctx = init_distributed("cpu", "gloo", ep)
    out = {}
    for router, cf, case in ALL:
        layer, xs, gs = _case(router, cf, case, world)
        apply_parallelism(layer, ctx)
        out[(rank, router, cf, case)] = _step(layer, xs[rank], gs[rank])
    return out


@pytest.mark.parametrize("world, ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_expert_parallel_layer_equals_single_process(world, ep):
    expected = _reference(world, ep)
    results = {}
    for part in run_distributed(_worker, world, ep):
        results.update(part)
    for key, (y, xg, grads, aux) in expected.items():
        got_y, got_xg, got_grads, got_aux = results[key]
        torch.testing.assert_close(got_y, y, **REORDERED_FP32, msg=lambda m: f"output {key}: {m}")
        torch.testing.assert_close(got_xg, xg, **REORDERED_FP32, msg=lambda m: f"input grad {key}: {m}")
        torch.testing.assert_close(got_aux, aux, **REORDERED_FP32_SCALAR, msg=lambda m: f"aux {key}: {m}")
        assert set(got_grads) == set(grads)
        for name in grads:
            torch.testing.assert_close(got_grads[name], grads[name], **REORDERED_FP32,
                                       msg=lambda m: f"grad {name} {key}: {m}")
