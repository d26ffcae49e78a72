"""Flex-MoE and Time-MoE (issue 7): the layers against hand-computed references, the models'
missing-modality and multi-resolution logic, the data sets and the errors users can hit."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pikv.config import load_config
from pikv.tasks import load_job
from pikv.data.multimodal import (FULL_COMBO, MODALITIES, NUM_COMBOS, check_inputs, combo_index, combo_mask,
                                  load_multimodal)
from pikv.data.samples import SampleLoader
from pikv.data.timeseries import Series, load_series, make_windows, seasonal_naive
from pikv.models.flex_moe import FlexMoE
from pikv.models.time_moe import TimeMoE
from pikv.moe import create_moe
from tests.helpers import REORDERED_FP32

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs") + "/"
H, E, K, F_ = 16, 8, 2, 32
SMALL = ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.num_experts=8",
         "model.expert_ffn_hidden_size=32", "model.ffn_hidden_size=64", "model.max_seq_len=48", "data.seq_len=48"]


def test_flex_router_general_and_specialised_routes():
    torch.manual_seed(0)
    layer = create_moe("flex", H, E, K, F_, deterministic=True)
    x = torch.randn(10, H)
    combo = torch.tensor([FULL_COMBO] * 4 + [0, 1, 2, 3, 4, 5])
    layer.router.combo_T = combo
    weights, ids, _, probs = layer.router(x)
    ref_probs = torch.softmax(x @ layer.router.gate.weight.T, -1)
    torch.testing.assert_close(probs, ref_probs)
    full_top = ref_probs[:4].topk(K).indices  # G-Router: plain softmax top-k
    assert torch.equal(ids[:4], full_top)
    for t in range(4, 10):  # S-Router: top-1 is the combination's expert, then the best other one
        c = int(combo[t])
        other = max((e for e in range(E) if e != c), key=lambda e: ref_probs[t, e])
        assert ids[t].tolist() == [c, other]
        w = ref_probs[t, [c, other]]
        torch.testing.assert_close(weights[t], w / w.sum())


def test_flex_layer_output_is_the_weighted_expert_sum():
    torch.manual_seed(0)
    layer = create_moe("flex", H, E, K, F_, deterministic=True)
    x = torch.randn(2, 3, H)
    combo = torch.tensor([[FULL_COMBO] * 3, [1] * 3])
    y = layer(x, combo)
    layer.router.combo_T = combo.reshape(-1)
    weights, ids, _, _ = layer.router(x.reshape(-1, H))
    ex = layer.experts
    ref = torch.zeros(6, H)
    for t, xt in enumerate(x.reshape(-1, H)):
        for w, e in zip(weights[t], ids[t]):
            ref[t] += w * (F.silu(xt @ ex.w1_EHF[e]) * (xt @ ex.w3_EHF[e])) @ ex.w2_EFH[e]
    torch.testing.assert_close(y.reshape(-1, H), ref, **REORDERED_FP32)  # per-token loop vs the layer
    with pytest.raises(ValueError, match="combo shape"):
        layer(x, combo[:1])


def test_time_layer_adds_a_sigmoid_gated_shared_expert():
    torch.manual_seed(0)
    layer = create_moe("time", H, E, K, F_, deterministic=True)
    torch.manual_seed(0)
    base = create_moe("base", H, E, K, F_, deterministic=True, renormalize=False)
    base.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared_expert")})
    x = torch.randn(5, H)
    s = layer.shared_expert
    shared = s.down_proj(F.silu(s.gate_proj(x)) * s.up_proj(x))
    torch.testing.assert_close(layer(x), base(x) + torch.sigmoid(layer.shared_expert_gate(x)) * shared)


@pytest.mark.parametrize("kind, options, match", [
    ("flex", {"num_modalities": 4}, "need >= 15"),
    ("flex", {"router": "sigmoid_topk"}, "allowed routers: softmax_topk"),
    ("flex", {"capacity_factor": 1.0}, "capacity_factor=1.0 must be None"),
    ("time", {"bogus": 1}, "allowed options"),
])
def test_variant_option_errors(kind, options, match):
    with pytest.raises(ValueError, match=match):
        create_moe(kind, H, E, K, F_, **options)


def test_flex_model_ignores_missing_values_and_uses_the_bank():
    cfg = load_config(None, SMALL + ["task=flex"])
    torch.manual_seed(0)
    model = FlexMoE(cfg.model, cfg.moe, cfg.flex).eval()
    feats = torch.randn(4, 10)
    observed = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    noisy = feats.clone()
    noisy[1, 2:] += 100.0  # modalities the sample does not have: must not matter
    noisy[3, :4] = -50.0
    torch.testing.assert_close(model(feats, observed), model(noisy, observed))
    model.train()
    model(feats, observed).sum().backward()
    used = {(int(c), m) for c, obs in zip(combo_index(observed), observed) for m in range(3) if not obs[m]}
    for c in range(NUM_COMBOS):
        for m in range(3):
            touched = model.bank.grad[c, m].abs().sum() > 0
            assert touched == ((c, m) in used), (c, m)


def test_flex_input_errors():
    ok = torch.zeros(2, 10)
    obs = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected \[batch, 10\].*3 modalities"):
        check_inputs(torch.zeros(2, 8), obs)
    with pytest.raises(ValueError, match=r"one column per modality"):
        check_inputs(ok, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no observed modality"):
        check_inputs(ok, torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool))
    bad = ok.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_inputs(bad, obs)


def test_multimodal_data_splits_and_missing_patterns():
    assert [combo_index(torch.from_numpy(combo_mask(c))[None]).item() for c in range(NUM_COMBOS)] == list(range(7))
    rnd = load_multimodal("random", 0.5, 0.15, 0.2, 1234)
    sizes = {k: len(v.labels) for k, v in rnd.items()}
    assert sum(sizes.values()) == 442 and sizes["heldout"] == 88
    assert rnd["train"].observed.any(1).all() and rnd["heldout"].observed.all()
    # standardised on train: zero mean up to fp32 rounding of the mean over the train rows
    np.testing.assert_allclose(rnd["train"].features.mean(0), 0, atol=1e-5)
    assert abs(rnd["train"].observed.mean() - 0.5) < 0.1 + 1 / 6  # rate 0.5, at least one kept
    st = load_multimodal("structured", 0.5, 0.15, 0.2, 1234)["train"].observed
    combos = {tuple(r) for r in st.tolist()}
    assert combos == {(True, True, True), (True, True, False), (True, False, False)}
    assert list(MODALITIES) == ["demographics", "exam", "serum"]


def test_sample_loader_resume_and_flex_order():
    gather = lambda ids: ids  # noqa: E731
    full = SampleLoader(10, 3, gather, seed=5)
    seen = [full.next_batch() for _ in range(7)]
    part = SampleLoader(10, 3, gather, seed=5)
    [part.next_batch() for _ in range(3)]
    resumed = SampleLoader(10, 3, gather, seed=5)
    resumed.load_state_dict(part.state_dict())
    assert all(np.array_equal(resumed.next_batch(), s) for s in seen[3:])
    ranks = [SampleLoader(10, 2, gather, r, 2, seed=5).next_batch() for r in range(2)]
    assert np.array_equal(np.concatenate(ranks), SampleLoader(10, 4, gather, seed=5).next_batch())
    with pytest.raises(ValueError, match="num_samples=10 does not match"):
        SampleLoader(11, 3, gather, seed=5).load_state_dict(part.state_dict())


def test_time_model_heads_loss_and_forecast():
    cfg = load_config(None, SMALL + ["task=time", "moe.num_shared_experts=1", "time.context_len=16"])
    torch.manual_seed(0)
    model = TimeMoE(cfg.model, cfg.moe, [1, 4]).eval()
    window = torch.randn(3, 20)
    preds = model(window[:, :16])
    assert preds.shape == (3, 16, 5)
    from pikv.tasks.time import TimeTask
    task = TimeTask.__new__(TimeTask)
    task.cfg, task.heads = cfg, [1, 4]
    ref = []
    for j, (p, lo) in enumerate(((1, 0), (4, 1))):
        tgt = torch.stack([window[:, t + 1:t + 1 + p] for t in range(16)], 1)
        ref.append(F.huber_loss(preds[..., lo:lo + p], tgt, delta=cfg.time.huber_delta))
    torch.testing.assert_close(task.loss_parts(preds, window)["huber_loss"], torch.stack(ref).mean())
    ctx = window[:, :16]
    torch.testing.assert_close(model.forecast(ctx, 4), model(ctx)[:, -1, 1:5])  # one round of the 4-head
    five = model.forecast(ctx, 5)  # 4-head, then the 1-head on the extended context
    ext = torch.cat([ctx, five[:, :4]], 1)
    torch.testing.assert_close(five[:, 4], model(ext[:, -48:])[:, -1, 0])
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 4), float("nan")))


def test_time_series_data_and_errors():
    train, heldout = load_series()
    names = [s.name for s in train + heldout]
    assert len(set(names)) == len(names) and "elnino" in [s.name for s in heldout]
    assert all(np.isfinite(s.values).all() for s in train + heldout)
    ws = make_windows(train, 16, 8, 0.0, 0.8)
    assert ws.windows.shape[1] == 24
    # context-normalised: zero mean up to fp32 rounding of series values far from 0
    np.testing.assert_allclose(ws.windows[:, :16].mean(1), 0, atol=1e-4)
    with pytest.raises(ValueError, match=r"'short' has 10 points, shorter than"):
        make_windows([Series("short", np.arange(10.0), 1)], 16, 8, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"'gap' has a NaN/inf value at index 3"):
        make_windows([Series("gap", np.r_[np.zeros(3), np.nan, np.zeros(40)], 1)], 16, 8, 0.0, 1.0)
    ctx = np.arange(12.0)[None]
    np.testing.assert_array_equal(seasonal_naive(ctx, np.array([4]), 6), [[8, 9, 10, 11, 8, 9]])


@pytest.mark.parametrize("override, match", [
    ("task=vision", "allowed values are lm, flex, time"),
    ("model.num_experts=4", "need >= 7"),
    ("kv.compressor=learned", "needs 'none'"),
    ("flex.missing=blocks", "allowed values are random, structured, none"),
])
def test_variant_config_errors(override, match):
    base = ["task=flex"] if not override.startswith("task=") else []
    with pytest.raises(ValueError, match=match):
        load_job(None, SMALL + base + [override] + (["model.top_k=2"] if "num_experts" in override else []))


def test_dense_baselines_have_the_active_parameters_of_the_moe_models():
    """The benchmarks' dense baselines (every FFN dense, width top_k x expert width, + the shared
    expert's for Time-MoE) differ from the MoE models' active parameters by the routers only."""
    flex = load_config(CONFIGS + "flex_diabetes.yaml")
    moe = FlexMoE(flex.model, flex.moe, flex.flex)
    dense = FlexMoE(flex.model, load_config(CONFIGS + "flex_diabetes.yaml", ["moe.every_n_layers=0"]).moe, flex.flex)
    m = flex.model
    per_expert = 3 * m.hidden_size * m.expert_ffn_hidden_size
    assert moe.num_active_params() == moe.num_params() - m.num_layers * (m.num_experts - m.top_k) * per_expert
    assert moe.num_active_params() - dense.num_params() == m.num_layers * m.num_experts * m.hidden_size
    t = load_config(CONFIGS + "time_statsmodels.yaml")
    width = (t.model.top_k + t.moe.num_shared_experts) * t.model.expert_ffn_hidden_size
    td = load_config(CONFIGS + "time_statsmodels.yaml", ["moe.every_n_layers=0", f"model.ffn_hidden_size={width}"])
    tm, tdm = TimeMoE(t.model, t.moe, t.time.heads), TimeMoE(td.model, td.moe, td.time.heads)
    router_and_gate = t.model.num_layers * (t.model.num_experts + 1) * t.model.hidden_size
    assert tm.num_active_params() - tdm.num_params() == router_and_gate
