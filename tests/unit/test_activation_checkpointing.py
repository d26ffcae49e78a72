"""train.activation_checkpointing: the same losses and gradients as without it (dense, MoE with
every router), the same routing on recompute, and router statistics counted once."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pikv.config import ModelConfig, MoEConfig, load_config
from pikv.models.activation_checkpoint import apply_activation_checkpointing
from pikv.models.transformer import Transformer
from pikv.moe.router import ROUTERS
from pikv.training.moe_metrics import MoEMetrics

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  max_seq_len=32, num_experts=4, top_k=2, expert_ffn_hidden_size=32)
# 1e-6 (fp32): recomputation runs the same kernels on the same inputs, so results are normally
# bitwise equal; the bound leaves room for nothing but fp32 rounding.
TOL = dict(atol=1e-6, rtol=0)


def _model(router="softmax_topk", dense=False, **moe):
    torch.manual_seed(0)
    return Transformer(CFG, MoEConfig(router=router, every_n_layers=0 if dense else 1, **moe))


def _tokens(seed=1, batch=3, seq=16):
    return torch.randint(0, CFG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    if model.moe_layers():
        router = model.router_losses()
        loss = loss + 0.01 * router["aux_loss"] + 0.001 * router["z_loss"]
    return loss


def _loss_and_grads(model, tokens, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # noisy_topk draws its noise from the global RNG
    loss = _loss(model, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [("dense", None)] + [("moe", r) for r in ROUTERS]


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("kind,router", CASES, ids=[c[1] or c[0] for c in CASES])
def test_losses_and_every_gradient_match_no_checkpointing(kind, router, mode):
    ref = _model(router or "softmax_topk", dense=kind == "dense").train()
    ac = apply_activation_checkpointing(copy.deepcopy(ref), mode)
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in ref.named_parameters()]  # names kept
    tokens = _tokens()
    loss_ref, grads_ref = _loss_and_grads(ref, tokens)
    loss_ac, grads_ac = _loss_and_grads(ac, tokens)
    torch.testing.assert_close(loss_ac, loss_ref, **TOL)
    assert grads_ac.keys() == grads_ref.keys() and len(grads_ref) == len(list(ref.parameters()))
    for name in grads_ref:
        torch.testing.assert_close(grads_ac[name], grads_ref[name], **TOL, msg=name)


def _record_routing(model):
    calls = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda mod, args, out: calls.append([t.detach().clone() for t in out]))
    return calls


ROUTING = [(r, False) for r in ROUTERS] + [("noisy_topk", True)]  # True: the router's own generator


@pytest.mark.parametrize("router,own_generator", ROUTING, ids=[r + "-own_generator" * g for r, g in ROUTING])
def test_recompute_routes_every_token_as_the_forward_did(router, own_generator):
    model = apply_activation_checkpointing(_model(router).train(), "full")
    if own_generator:
        for layer in model.moe_layers():
            layer.router.generator = torch.Generator().manual_seed(3)
    calls = _record_routing(model)
    _loss(model, _tokens()).backward()
    n = len(model.moe_layers())
    assert len(calls) == 2 * n, "each router runs once in forward and once in the recompute"
    forward, recompute = calls[:n], calls[n:][::-1]  # backward recomputes the last block first
    for fwd, again in zip(forward, recompute):
        for a, b in zip(fwd, again):  # weights, expert (or token) ids, logits, probs
            assert torch.equal(a, b)


def test_noisy_generator_continues_as_without_checkpointing():
    """After forward + backward the router's own generator is where a run without AC leaves it."""
    states = []
    for mode in ("none", "full"):
        model = apply_activation_checkpointing(_model("noisy_topk").train(), mode)
        for layer in model.moe_layers():
            layer.router.generator = torch.Generator().manual_seed(3)
        _loss(model, _tokens()).backward()
        states.append([layer.router.generator.get_state() for layer in model.moe_layers()])
    assert all(torch.equal(a, b) for a, b in zip(*states))


def _train(mode, steps=4, rate=0.05):
    """A few AdamW steps with the trainer's per-step bookkeeping: metrics accumulated and the
    aux-loss-free bias moved from layer.metrics after each backward."""
    model = apply_activation_checkpointing(_model("sigmoid_topk").train(), mode)
    layers = model.moe_layers()
    metrics = MoEMetrics(list(enumerate(layers)), CFG.num_experts, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows, seen = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        # Without early stop the recompute runs each block to its end, MoE statistics included:
        # the case where a second count could happen (read at forward time).
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            loss = _loss(model, _tokens(seed=step))
        after_forward = [layer.metrics for layer in layers]
        loss.backward()
        seen.append([layer.metrics is m for layer, m in zip(layers, after_forward)])
        metrics.accumulate()
        opt.step()
        for layer in layers:
            layer.router.update_bias(layer.metrics["tokens_per_expert"], rate)
        rows.append(metrics.read())
    return rows, [layer.router.expert_bias.clone() for layer in layers], seen


def test_load_metrics_and_bias_counts_are_counted_once():
    rows_ref, bias_ref, _ = _train("none")
    for mode in ("full", "selective"):
        rows, bias, seen = _train(mode)
        assert all(all(s) for s in seen), "after backward a layer's metrics are its forward's, not a recompute's"
        assert rows == rows_ref, mode
        for a, b in zip(bias, bias_ref):
            assert torch.equal(a, b), mode
    tokens = _tokens()[:, :-1].numel()
    for row in rows_ref:  # each token-slot counted once: T * K per layer and step
        assert sum(row["moe/layer0/tokens_per_expert"]) == tokens * CFG.top_k
    assert any(b.abs().sum() > 0 for b in bias_ref), "the bias never moved: the test would not cover it"


def test_a_deep_copy_checkpoints_its_own_blocks():
    ref = _model()
    copied = copy.deepcopy(apply_activation_checkpointing(copy.deepcopy(ref), "full"))
    tokens = _tokens()
    loss_ref, grads_ref = _loss_and_grads(ref, tokens)
    loss_copy, grads_copy = _loss_and_grads(copied, tokens)
    torch.testing.assert_close(loss_copy, loss_ref, **TOL)
    assert grads_copy.keys() == grads_ref.keys()  # the copy's own parameters got every gradient


def test_eval_and_no_grad_forward_skip_checkpointing():
    ref = _model().eval()
    ac = apply_activation_checkpointing(copy.deepcopy(ref), "full")
    with torch.no_grad():
        torch.testing.assert_close(ac(_tokens()), ref(_tokens()), atol=0, rtol=0)


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="activation checkpointing mode 'partial' is invalid: allowed values are "
                                         "none, full, selective"):
        apply_activation_checkpointing(_model(), "partial")
    with pytest.raises(ValueError, match="config key 'train.activation_checkpointing' = 'some' is invalid: "
                                         "allowed values are none, full, selective"):
        load_config(overrides=["train.activation_checkpointing=some"])


@pytest.mark.parametrize("through_latent", [False, True], ids=["side", "cotrain"])
def test_kv_compressor_loss_and_grads_match_and_recompute_records_nothing(through_latent):
    """The compressor's attention error is taken from the original forward once; the recompute
    in backward leaves nothing behind in the trainer's KVTrainState (it would hold a graph)."""
    from pikv.config import KVConfig
    from pikv.kv.learned import KVTrainState

    torch.manual_seed(0)
    ref = Transformer(CFG, MoEConfig(), kv_cfg=KVConfig(compressor="learned", latent_window=2)).train()
    ac = apply_activation_checkpointing(copy.deepcopy(ref), "full")
    tokens = _tokens()
    results = []
    for model in (ref, ac):
        state = KVTrainState.attach(model)
        state.set(state.compressors[0].max_rank // 4, through_latent)
        model.zero_grad(set_to_none=True)
        loss = _loss(model, tokens)
        kv_loss = state.pop_loss()
        assert kv_loss.item() > 0
        (loss + kv_loss).backward()
        assert state._losses == {}  # nothing recorded by the recompute
        results.append((loss.detach(), kv_loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_ref, kv_ref, g_ref), (l_ac, kv_ac, g_ac) = results
    torch.testing.assert_close(l_ac, l_ref, **TOL)
    torch.testing.assert_close(kv_ac, kv_ref, **TOL)
    assert g_ac.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_ac[name], g_ref[name], **TOL, msg=name)
