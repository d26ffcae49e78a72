"""Activation checkpointing and torch.compile under expert parallelism (EP=2, forked gloo): the
same losses and gradients on every rank as the same EP model without them."""

import pytest
import torch
import torch.nn.functional as F

from pikv.config import ModelConfig, MoEConfig, TrainConfig
from pikv.distributed import init_distributed
from pikv.models.parallelize import apply_parallelism
from pikv.models.transformer import Transformer
from pikv.moe.router import ROUTERS
from pikv.testing import run_distributed

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  max_seq_len=32, num_experts=4, top_k=2, expert_ffn_hidden_size=32)


def _model(ctx, router, **train):
    torch.manual_seed(0)  # the same full model on every rank, then sharded
    return apply_parallelism(Transformer(CFG, MoEConfig(router=router)).train(), ctx, TrainConfig(**train))


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    router = model.router_losses()
    return (F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + 0.01 * router["aux_loss"]
            + 0.001 * router["z_loss"])


def _tokens(rank, step=0):
    """Counting sequences (learnable), different on each rank."""
    starts = torch.randint(0, CFG.vocab_size, (3, 1), generator=torch.Generator().manual_seed(100 * rank + step))
    return (starts + torch.arange(17)) % CFG.vocab_size


def _ac_worker(rank, world):
    ctx = init_distributed("cpu", "gloo", ep_size=world)
    mismatches = []
    for router in ROUTERS:
        results = {}
        for mode in ("none", "full", "selective"):
            model = _model(ctx, router, activation_checkpointing=mode)
            torch.manual_seed(7 + rank)  # noisy_topk's noise
            loss = _loss(model, _tokens(rank))
            loss.backward()
            results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                             [m.metrics["tokens_per_expert"] for m in model.moe_layers()])
        ref_loss, ref_grads, ref_counts = results["none"]
        assert ref_grads["layers.0.mlp.experts.w1_EHF"].shape[0] == CFG.num_experts // world  # sharded
        for mode in ("full", "selective"):
            loss, grads, counts = results[mode]
            # 1e-6 (fp32): the recompute runs the same kernels on the same rows.
            if not torch.allclose(loss, ref_loss, atol=1e-6, rtol=0):
                mismatches.append((router, mode, "loss"))
            mismatches += [(router, mode, n) for n in ref_grads
                           if not torch.allclose(grads[n], ref_grads[n], atol=1e-6, rtol=0)]
            mismatches += [(router, mode, "counts") for a, b in zip(counts, ref_counts) if not torch.equal(a, b)]
    return mismatches


def test_activation_checkpointing_matches_under_expert_parallelism():
    assert run_distributed(_ac_worker, 2) == [[], []]


def _explain_worker(rank, world, ep):
    ctx = init_distributed("cpu", "gloo", ep_size=ep)
    model = _model(ctx, "softmax_topk")
    x = torch.randn(2, 16, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.layers[0])(x, model.rope, 0)
    return {f"{b.user_stack[-1].name}:{b.user_stack[-1].line}" for b in explained.break_reasons}


def test_graph_breaks_are_only_the_all_to_all():
    """Data parallel: none (the aux loss's all-reduce is traced). EP=2: only the dispatcher's two
    halves, whose all-to-all split sizes are data-dependent host integers."""
    assert run_distributed(_explain_worker, 2, 1) == [set(), set()]
    expected = {"forward:x_NH, counts_E, state = self.dispatcher.dispatch(",
                "forward:y_TH = self.dispatcher.combine(y_NH, weights_TK, state)"}
    assert run_distributed(_explain_worker, 2, 2) == [expected, expected]


def _compile_worker(rank, world, steps):
    ctx = init_distributed("cpu", "gloo", ep_size=world)
    losses = {}
    for compiled in (False, True):
        model = _model(ctx, "softmax_topk", compile=compiled)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[compiled] = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, _tokens(rank, step))
            loss.backward()
            opt.step()
            losses[compiled].append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses_under_expert_parallelism():
    for losses in run_distributed(_compile_worker, 2, 6, timeout_s=600):
        # 1e-5 relative: inductor's fused elementwise kernels round differently in fp32.
        assert losses[True] == pytest.approx(losses[False], rel=1e-5)
