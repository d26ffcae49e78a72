"""The trainer's step hooks (pikv/training/hooks.py), each against a plain reference."""

import json
import os
import signal

import pytest
import torch

from pikv.config import load_config
from pikv.kv.learned import TrainSchedule
from pikv.models import Transformer
from pikv.training.hooks import (KVCompressorHook, LossTerms, MicroBatch, NaNInjectionHook, PreemptionHook,
                                 RouterHook, combine)

TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.expert_ffn_hidden_size=32",
        "model.num_experts=4", "model.max_seq_len=32", "data.seq_len=32", "train.max_steps=10",
        "model.rotary_fraction=1.0"]  # head dim 8: the decoupled latent's rotated dims alone exceed a 4x budget


def _model(overrides):
    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)
    return cfg, Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv).train()


def _tokens(seed):
    return torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed))


def test_combine_weights_the_task_loss_and_adds_each_term():
    task, a, b = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    loss, metrics = combine(task, [LossTerms([(0.5, a)], {"a": a}, task_weight=0.25),
                                   LossTerms([(0.1, b)], {"b": b}, task_weight=2.0)])
    assert loss.item() == pytest.approx(0.25 * 2.0 * 2.0 + 0.5 * 3.0 + 0.1 * 5.0)
    assert metrics == {"a": a, "b": b}
    assert combine(task, [LossTerms()])[0] is task  # no hook term: the task loss itself


@pytest.mark.parametrize("updated", [True, False])
def test_router_hook_moves_the_bias_by_the_steps_summed_counts(updated):
    cfg, model = _model(["moe.router=sigmoid_topk", "kv.compressor=none"])
    hook = RouterHook(model, 0.01, 0.001, 0.05, world_size=1)
    assert len(hook.bias_layers) == 2
    before = [layer.router.expert_bias.clone() for layer in hook.bias_layers]
    counts = [0, 0]
    hook.before_step(0)
    for seed in (1, 2):  # two micro-batches
        model(_tokens(seed))
        counts = [c + layer.metrics["tokens_per_expert"] for c, layer in zip(counts, hook.bias_layers)]
        router = model.router_losses()
        loss, metrics = combine(torch.tensor(1.0), [hook.loss_terms(None)])
        assert loss.item() == pytest.approx(1.0 + 0.01 * router["aux_loss"].item() + 0.001 * router["z_loss"].item())
        assert set(metrics) == {"aux_loss", "z_loss"}
        hook.after_micro_batch()
    hook.after_step(0, updated=updated)
    for layer, b0, c in zip(hook.bias_layers, before, counts):
        load = c.float()
        expected = b0 + 0.05 * torch.sign(load.mean() - load) if updated else b0  # DeepSeek-V3 sec. 2.1.2
        torch.testing.assert_close(layer.router.expert_bias, expected, rtol=0, atol=0)
    assert not RouterHook(_model(["kv.compressor=none"])[1], 0.01, 0.001, 0.05, 1).bias_layers  # softmax_topk


def test_kv_hook_follows_the_schedule_then_returns_the_model_to_the_full_cache():
    cfg, model = _model([])
    hook = KVCompressorHook(model, cfg)
    m = cfg.model
    schedule = TrainSchedule(m.num_kv_heads, m.hidden_size // m.num_heads, cfg.kv.train_ratios, cfg.kv.full_every,
                             cfg.kv.cotrain_start, 10, cfg.kv.latent_bits, cfg.kv.latent_window, 32)
    x = _tokens(3)
    with torch.no_grad():
        full = model(x)
    seen = set()
    for step in range(10):
        hook.before_step(step)
        rank, through_latent = schedule.at(step)
        logits = model(x)
        terms = hook.loss_terms(MicroBatch(step, x, logits, torch.tensor(0.0)))
        (weight, distill), = terms.terms
        assert weight == cfg.kv.attn_error_weight
        assert terms.metrics["kv_rank"].item() == (rank or 0) and terms.metrics["kv_cotrain"].item() == through_latent
        assert (distill.item() > 0) == (rank is not None)
        assert torch.equal(logits, full) == (rank is None or not through_latent)  # side distillation: model untouched
        hook.after_step(step, updated=True)
        with torch.no_grad():
            assert torch.equal(model(x), full)  # validation and checkpoints see the full cache
        seen.add((rank, through_latent))
    assert {(r is None, t) for r, t in seen} == {(False, False), (True, True), (False, True)}


def test_kv_loss_of_a_recomputed_forward_is_counted_once():
    # activation checkpointing runs a block's forward again: the per-layer losses are replaced, not added
    cfg, model = _model([])
    hook = KVCompressorHook(model, cfg)
    hook.before_step(0)
    x = _tokens(4)
    model(x)
    once = hook.state.pop_loss()
    model(x)
    model(x)
    torch.testing.assert_close(hook.state.pop_loss(), once, rtol=0, atol=0)


def test_nan_hook_poisons_only_its_steps_gradients_included(monkeypatch):
    monkeypatch.setenv("PIKV_TEST_NAN_STEPS", "2, 4")
    hook = NaNInjectionHook.from_env()
    w = torch.tensor(1.5, requires_grad=True)
    for step in range(5):
        loss, _ = combine(w * 2.0, [hook.loss_terms(MicroBatch(step, None, None, None))])
        loss.backward()
        assert torch.isnan(loss).item() == (step + 1 in (2, 4)) and torch.isnan(w.grad).item() == (step + 1 in (2, 4))
        w.grad = None
    monkeypatch.setenv("PIKV_TEST_NAN_STEPS", "")
    assert NaNInjectionHook.from_env() is None


class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, msg):
        self.lines.append(msg)


def test_preemption_hook_stop_file_marker_and_handlers(tmp_path, monkeypatch):
    stop, requeue = tmp_path / "stop", tmp_path / "requeue.json"
    monkeypatch.setenv("PIKV_STOP_FILE", str(stop))
    monkeypatch.setenv("PIKV_PREEMPT_FILE", str(requeue))
    (tmp_path / "preempted.json").write_text("{}")  # from an earlier attempt
    previous = signal.getsignal(signal.SIGTERM)
    log = _Log()
    hook = PreemptionHook(tmp_path, is_main=True, log=log)
    assert not (tmp_path / "preempted.json").exists() and not hook.requests_stop()
    stop.touch()
    assert hook.requests_stop()
    hook.on_stop(7, tmp_path / "step_7")
    marker = json.loads((tmp_path / "preempted.json").read_text())
    assert marker == {"step": 7, "checkpoint": str(tmp_path / "step_7"), "signal": "the stop file"}
    assert json.loads(requeue.read_text()) == marker and "stopped by the stop file after step 7" in log.lines[0]
    hook.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_preemption_hook_notes_a_signal(tmp_path, monkeypatch):
    monkeypatch.delenv("PIKV_STOP_FILE", raising=False)
    monkeypatch.delenv("PIKV_PREEMPT_FILE", raising=False)
    hook = PreemptionHook(tmp_path, is_main=False, log=_Log())
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill returns
        assert hook.requests_stop()
        hook.on_stop(3, None)
        assert not (tmp_path / "preempted.json").exists()  # only the main rank writes the marker
        assert "stopped by SIGUSR1" in hook.log.lines[0]
    finally:
        hook.close()
