"""Every router of create_moe('base') and the shared experts vs an independent reference: plain
Python routing (sorted() with explicit tie-breaking, float64 Sinkhorn by alternating row/column
normalisation) and a per-expert loop over the assigned tokens, in fp32.

Shapes: T tokens, H hidden, E experts, K experts per token, F expert FFN hidden, C tokens per expert.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pikv.config import MoEConfig, load_config
from pikv.tasks import load_job
from pikv.distributed.grad_sync import is_expert_param
from pikv.models import Transformer
from pikv.moe import create_moe
from pikv.moe.losses import expert_counts
from pikv.moe.router import ROUTERS, sinkhorn

from tests.unit.test_model import tiny
from tests.helpers import EXACT, REORDERED_FP32, seeded

H, E, Fh, T = 16, 4, 32, 24
TOKEN_CHOICE = ("softmax_topk", "sigmoid_topk", "noisy_topk", "sinkhorn")


# ---- independent reference -------------------------------------------------------------------
def ref_sinkhorn(logits_TE, iters):
    """Alternating normalisation in float64: rows to 1/T, then columns to 1/E."""
    p = torch.exp(logits_TE.detach().double())
    n_t, n_e = p.shape
    for _ in range(iters):
        p = p / (n_t * p.sum(1, keepdim=True))
        p = p / (n_e * p.sum(0, keepdim=True))
    return p


def _best(scores, n):
    """Indices of the n largest entries; ties -> lower index."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i].detach()), i))[:n]


def ref_assign(name, x, p, K, *, renormalize=True, route_scale=1.0, bias=None, eps_TE=None,
               training=True, iters=30, cf=None):
    """-> (pairs [(token, expert, weight)] in token order (expert choice: expert order), C)."""
    logits = x @ p["router.gate.weight"].T
    if eps_TE is not None:
        logits = logits + eps_TE * F.softplus(x @ p["router.noise.weight"].T)
    n_t, n_e = logits.shape
    if name == "expert_choice":
        probs = torch.softmax(logits, -1)
        C = min(n_t, math.ceil((1.0 if cf is None else cf) * n_t * K / n_e))
        pairs = [(t, e, probs[t, e] * route_scale) for e in range(n_e) for t in _best(probs[:, e], C)]
        return pairs, C
    if name in ("softmax_topk", "noisy_topk"):
        gate = choose = torch.softmax(logits, -1)
    elif name == "sigmoid_topk":
        gate = torch.sigmoid(logits)
        choose = gate.detach() + (0 if bias is None else bias)
    else:  # sinkhorn, Megatron: sigmoid for K = 1, softmax for K > 1, never renormalised
        gate = torch.sigmoid(logits) if K == 1 else torch.softmax(logits, -1)
        choose = ref_sinkhorn(logits, iters) if training else gate.detach()
        renormalize = False
    pairs = []
    for t in range(n_t):
        chosen = _best(choose[t], K)
        ws = [gate[t, e] for e in chosen]
        total = sum(ws)
        pairs += [(t, e, (w / total if renormalize else w) * route_scale) for e, w in zip(chosen, ws)]
    return pairs, None


def ref_moe(x, p, pairs, n_e, capacity=None):
    """Per expert: its pairs in order, the first `capacity` kept, one SwiGLU over its rows."""
    out = [torch.zeros(x.shape[1]) for _ in range(x.shape[0])]
    used, dropped = [0] * n_e, 0
    w1, w3, w2 = p["experts.w1_EHF"], p["experts.w3_EHF"], p["experts.w2_EFH"]
    for e in range(n_e):
        mine = [(t, w) for t, ee, w in pairs if ee == e]
        if capacity is not None:
            dropped += max(0, len(mine) - capacity)
            mine = mine[:capacity]
        used[e] = len(mine)
        if not mine:
            continue
        xe = x[[t for t, _ in mine]]
        ye = (F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e]
        for i, (t, w) in enumerate(mine):
            out[t] = out[t] + w * ye[i]
    y = torch.stack(out)
    if "shared_experts.down_proj.weight" in p:
        g, u, d = (p[f"shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down"))
        y = y + (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    return y, used, dropped


def check(layer, x_TH, name, *, seed=None, **ref_kw):
    """Output, input grad and EVERY parameter grad of `layer` vs the reference."""
    params = dict(layer.named_parameters())
    ref_p = {n: q.detach().clone().requires_grad_() for n, q in params.items()}
    eps_TE = None
    if seed is not None:
        layer.router.generator = seeded(seed)
        eps_TE = torch.randn(x_TH.shape[0], layer.num_experts, generator=seeded(seed))
    x1, x2 = x_TH.clone().requires_grad_(), x_TH.clone().requires_grad_()
    grad_TH = torch.randn_like(x_TH)
    y = layer(x1)
    (y * grad_TH).sum().backward()
    router = layer.router
    pairs, C = ref_assign(name, x2, ref_p, layer.top_k, renormalize=router.renormalize,
                          route_scale=router.route_scale, eps_TE=eps_TE, training=layer.training,
                          bias=getattr(router, "expert_bias", None), cf=layer.capacity_factor, **ref_kw)
    capacity = None if name == "expert_choice" else layer.capacity(x_TH.shape[0])
    y_ref, used, dropped = ref_moe(x2, ref_p, pairs, layer.num_experts, capacity)
    (y_ref * grad_TH).sum().backward()
    torch.testing.assert_close(y, y_ref, **REORDERED_FP32)  # the reference adds in per-token order
    torch.testing.assert_close(x1.grad, x2.grad, **REORDERED_FP32)
    for n, q in params.items():
        if q.grad is None:  # unused (the noise weight in eval): unused by the reference too
            assert ref_p[n].grad is None, n
            continue
        r_grad = ref_p[n].grad if ref_p[n].grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(q.grad, r_grad, **REORDERED_FP32, msg=lambda m: f"grad {n}: {m}")
    m = layer.metrics
    if name == "expert_choice":
        picked = {t for t, _, _ in pairs}
        assert m["tokens_per_expert"].tolist() == [C] * layer.num_experts == used
        assert m["dropped_fraction"].item() == pytest.approx(1 - len(picked) / x_TH.shape[0])
    else:
        assert round(m["dropped_fraction"].item() * x_TH.shape[0] * layer.top_k) == dropped
        assert m["tokens_per_expert"].tolist() == [sum(1 for _, e, _ in pairs if e == i)
                                                   for i in range(layer.num_experts)]
    return used, dropped


def make(router, K=2, n_e=E, **kw):
    """Seeds the global RNG: the inputs a test draws after make() are the same on every run."""
    torch.manual_seed(0)
    deterministic = kw.pop("deterministic", True)
    layer = create_moe("base", H, n_e, K, Fh, router=router, deterministic=deterministic, **kw)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.5)
    return layer


def steer(layer, x_TH, hot, cold=None):
    """Feature 0 is a large constant: expert `hot` wins every token, `cold` never does."""
    x_TH[:, 0] = 5.0
    with torch.no_grad():
        layer.router.gate.weight[:, 0] = 0.0
        layer.router.gate.weight[hot, 0] = 4.0
        if cold is not None:
            layer.router.gate.weight[cold, 0] = -4.0


def skew(layer, x_TH):
    """Most tokens prefer expert 0, then 1; expert 7 is disfavoured; scores still vary per token."""
    x_TH[:, 0] = 1.0 + 0.5 * x_TH[:, 0]
    with torch.no_grad():
        w = layer.router.gate.weight
        w[:, 0] = 0.0
        w[0, 0], w[1, 0], w[7, 0] = 2.5, 1.5, -2.0


# ---- parity: every router x capacity x shared experts ------------------------------------------
CASES = [("softmax_topk", dict(renormalize=True)), ("softmax_topk", dict(renormalize=False)),
         ("sigmoid_topk", dict(renormalize=True)), ("sigmoid_topk", dict(renormalize=False, route_scale=2.5)),
         ("noisy_topk", dict(deterministic=False)), ("sinkhorn", dict()), ("sinkhorn", dict(route_scale=2.0)),
         ("expert_choice", dict()), ("expert_choice", dict(route_scale=1.5))]


@pytest.mark.parametrize("router, kw", CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CASES)])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("shared", [0, 2])
def test_router_matches_reference(router, kw, capacity_factor, shared):
    layer = make(router, capacity_factor=capacity_factor, num_shared_experts=shared,
                 shared_ffn_hidden_size=8 if shared else None, **dict(kw))
    x_TH = torch.randn(T, H)
    used, dropped = check(layer, x_TH, router, seed=11 if router == "noisy_topk" else None)
    if router == "expert_choice":
        C = math.ceil((capacity_factor or 1.0) * T * 2 / E)
        assert used == [C] * E and layer.router.capacity(T) == C
    elif capacity_factor == 0.5:
        assert dropped > 0 and max(used) == layer.capacity(T)  # the drop path is exercised
    if shared:
        assert layer.shared_experts.gate_proj.weight.shape == (2 * 8, H)


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@pytest.mark.parametrize("capacity_factor", [None, 2.0])
def test_all_tokens_to_one_expert_and_an_empty_expert(router, capacity_factor):
    layer = make(router, K=1, n_e=8, capacity_factor=capacity_factor).eval()  # eval: sinkhorn = top-k
    x_TH = torch.randn(12, H)
    steer(layer, x_TH, hot=3, cold=5)
    used, dropped = check(layer, x_TH, router)
    cap = layer.capacity(12)
    assert used == [0, 0, 0, 12 if cap is None else cap, 0, 0, 0, 0]
    assert dropped == (0 if cap is None else 12 - cap)
    assert layer.experts.w1_EHF.grad[[0, 1, 2, 4, 5, 6, 7]].abs().max() == 0


def test_noisy_topk_k1_and_sinkhorn_k1_train_match_reference():
    for router, seed in (("noisy_topk", 3), ("sinkhorn", None)):  # K = 1: sinkhorn gates by sigmoid
        layer = make(router, K=1, deterministic=False)
        check(layer, torch.randn(T, H), router, seed=seed)


# ---- sigmoid_topk + aux-loss-free balancing -------------------------------------------------
def test_sigmoid_bias_changes_selection_not_gate_weights():
    layer = make("sigmoid_topk", K=2)
    router = layer.router
    assert "expert_bias" in dict(router.named_buffers())
    assert "expert_bias" not in dict(router.named_parameters())
    assert "router.expert_bias" in layer.state_dict() and not router.expert_bias.requires_grad
    x_TH = torch.randn(T, H)
    _, ids_plain, _, _ = router(x_TH)
    assert not (ids_plain == 3).any(dim=1).all()
    with torch.no_grad():
        router.expert_bias[3] = 10.0
    weights_TK, ids_TK, logits_TE, _ = router(x_TH)
    assert (ids_TK[:, 0] == 3).all()  # the bias forces expert 3 into every token's choice
    unbiased = torch.sigmoid(logits_TE).gather(1, ids_TK)
    torch.testing.assert_close(weights_TK, unbiased / unbiased.sum(-1, keepdim=True))
    check(layer, x_TH, "sigmoid_topk")  # reference chooses with the bias, gates without it
    assert router.expert_bias.grad is None


def test_update_bias_step_and_balancing():
    layer = make("sigmoid_topk", K=2, n_e=8)
    router = layer.router
    router.update_bias(torch.tensor([10, 2, 4, 4, 4, 4, 4, 0]), rate=0.1)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1]))
    with torch.no_grad():
        router.expert_bias.zero_()
    x_TH = torch.randn(256, H)
    skew(layer, x_TH)

    def imbalance():
        counts = expert_counts(router(x_TH)[1], 8).float()
        return counts, (counts.max() / counts.mean()).item()

    counts, first = imbalance()
    for _ in range(300):
        router.update_bias(counts, rate=0.01)
        counts, last = imbalance()
    assert first > 2.0 and last < 1.1, (first, last)
    assert router.expert_bias[0] < 0 < router.expert_bias[7]


# ---- noisy_topk ------------------------------------------------------------------------------
def test_noisy_topk_eval_is_noiseless_and_training_is_seeded():
    noisy = make("noisy_topk", deterministic=False)
    plain = make("softmax_topk")
    missing, unexpected = plain.load_state_dict(noisy.state_dict(), strict=False)
    assert not missing and unexpected == ["router.noise.weight"]
    x_TH = torch.randn(T, H)
    noisy.eval()
    with torch.no_grad():
        y_eval = noisy(x_TH)
        torch.testing.assert_close(noisy(x_TH), y_eval, **EXACT)
        torch.testing.assert_close(y_eval, plain(x_TH), **EXACT)
        noisy.train()
        outs = []
        for seed in (5, 5, 6):
            noisy.router.generator = seeded(seed)
            outs.append(noisy(x_TH))
        torch.testing.assert_close(outs[0], outs[1], **EXACT)
        assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], y_eval)
        noisy.router.deterministic = True  # deterministic mode: no noise even in training
        torch.testing.assert_close(noisy(x_TH), y_eval, **EXACT)


# ---- expert_choice -------------------------------------------------------------------------
@pytest.mark.parametrize("capacity_factor, C", [(None, 12), (0.25, 3), (5.0, T)])
def test_expert_choice_every_expert_gets_exactly_C(capacity_factor, C):
    layer = make("expert_choice", capacity_factor=capacity_factor)
    x_TH = torch.randn(T, H)
    used, _ = check(layer, x_TH, "expert_choice")
    weights_EC, token_ids_EC, _, probs_TE = layer.router(x_TH)
    assert token_ids_EC.shape == (E, C) and used == [C] * E
    assert all(len(set(row.tolist())) == C for row in token_ids_EC)  # C distinct tokens per expert
    torch.testing.assert_close(weights_EC, probs_TE.t().gather(1, token_ids_EC))
    if capacity_factor == 0.25:
        assert layer.metrics["dropped_fraction"].item() > 0  # some token picked by no expert
    torch.testing.assert_close(layer.aux_loss, torch.tensor(1.0))  # balanced by construction


def test_unpicked_token_gets_zero_moe_output():
    layer = make("expert_choice", capacity_factor=0.25)  # C = 3: at most 12 of 24 tokens picked
    x_TH = torch.randn(T, H)
    y = layer(x_TH)
    picked = set(layer.router(x_TH)[1].flatten().tolist())
    unpicked = [t for t in range(T) if t not in picked]
    assert unpicked and y[unpicked].abs().max() == 0
    assert layer.metrics["dropped_fraction"].item() == pytest.approx(len(unpicked) / T)


# ---- sinkhorn --------------------------------------------------------------------------------
def test_sinkhorn_balances_a_skewed_batch_and_converges():
    x_TH = torch.randn(64, H, generator=seeded(0))
    loads = {}
    for router in ("softmax_topk", "sinkhorn"):
        layer = make(router, K=2, n_e=8)
        x = x_TH.clone()
        skew(layer, x)
        layer(x)
        counts = layer.metrics["tokens_per_expert"].float()
        loads[router] = (counts.max() / counts.mean()).item()
    # 128 slots over 8 experts, 16 on average. Over 20 input seeds softmax_topk put 37-46 on its
    # busiest expert (>= 2.3x the mean) and sinkhorn 18-22 (<= 1.4x): top-2 of a balanced plan is
    # not exactly balanced. The thresholds leave margin on both sides of that gap.
    assert loads["softmax_topk"] > 2.0 and loads["sinkhorn"] < 1.5, loads
    logits = (x @ layer.router.gate.weight.T).requires_grad_()
    row_err = []
    for iters in (3, 10, 30, 100):
        p = sinkhorn(logits, iters)
        assert not p.requires_grad
        # columns are normalised last: exact up to the rounding of one fp32 sum of 64 terms
        torch.testing.assert_close(p.sum(0), torch.full((8,), 1 / 8), rtol=1e-5, atol=0)
        # fp32 vs the float64 reference: rounding compounds over up to 100 normalisations
        torch.testing.assert_close(p.double(), ref_sinkhorn(logits, iters), rtol=1e-4, atol=0)
        row_err.append((p.sum(1) * 64 - 1).abs().max().item())
    # Converging: the row error falls by orders of magnitude while it is above fp32 rounding, and
    # from 30 iterations (the default) on it sits at the rounding floor. Not monotone there: a row
    # sum of 8 fp32 probabilities, scaled by 64, is off by a few ulps (1.2e-7), measured 4e-7 to
    # 8e-7 over 12 seeds, either side of 30 vs 100 iterations. fp32_floor leaves 10x headroom.
    fp32_floor = 1e-5
    assert row_err[0] > 10 * row_err[1] > 10 * fp32_floor, row_err
    assert max(row_err[2:]) < fp32_floor, row_err
    # unskewed logits: converged at the default count
    p = sinkhorn(torch.randn(64, 8, generator=seeded(1)), 30)
    torch.testing.assert_close(p.sum(1), torch.full((64,), 1 / 64), rtol=fp32_floor, atol=0)


def test_sinkhorn_eval_is_plain_topk():
    sk, plain = make("sinkhorn").eval(), make("softmax_topk").eval()
    x_TH = torch.randn(T, H)
    steer(sk, x_TH, hot=0)
    plain.load_state_dict(sk.state_dict())
    assert torch.equal(sk.router(x_TH)[1], plain.router(x_TH)[1])


# ---- deterministic mode, fp32 under autocast ---------------------------------------------------
@pytest.mark.parametrize("router", ROUTERS)
def test_deterministic_ties_pick_lower_index(router):
    # 64 experts / tokens: sizes where torch.topk and unstable sorts do not favour low indices
    layer = make(router, n_e=64, deterministic=True)  # training mode: noise / sinkhorn paths active
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # every score ties
    _, ids, _, _ = layer.router(torch.randn(64, H))
    assert ids.tolist() == [[0, 1]] * 64  # expert choice: C = 64 * 2 / 64, lowest tokens win


@pytest.mark.parametrize("router", ROUTERS)
def test_router_math_is_fp32_under_bf16_autocast(router):
    layer = make(router, num_shared_experts=1)
    x_TH = torch.randn(T, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, _, logits, probs = layer.router(x_TH)
        y = layer(x_TH)
    assert weights.dtype == logits.dtype == probs.dtype == torch.float32
    torch.testing.assert_close(logits, x_TH @ layer.router.gate.weight.T, **REORDERED_FP32)  # another matmul kernel
    assert torch.isfinite(y).all()


# ---- shared experts in the model --------------------------------------------------------------
def test_shared_experts_are_dense_params_and_always_active():
    cfg = tiny()
    moe_cfg = MoEConfig(every_n_layers=2, num_shared_experts=2, shared_ffn_hidden_size=8,
                        router="sigmoid_topk", route_scale=2.0)
    model = Transformer(cfg, moe_cfg)
    layer = model.moe_layers()[0]
    assert layer.router.route_scale == 2.0 and type(layer.router).__name__ == "SigmoidTopKRouter"
    shared = [n for n, _ in model.named_parameters() if "shared_experts" in n]
    assert len(shared) == 3 and not any(is_expert_param(n) for n in shared)
    assert all(is_expert_param(n) for n, _ in model.named_parameters() if ".mlp.experts." in n)
    base = Transformer(cfg, MoEConfig(every_n_layers=2))
    shared_params = 3 * cfg.hidden_size * 2 * 8
    assert model.num_params() == base.num_params() + shared_params
    assert model.num_active_params() == base.num_active_params() + shared_params
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "shared_experts" in n)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_runs_in_the_model(router):
    model = Transformer(tiny(), MoEConfig(router=router, sinkhorn_iterations=5))
    logits = model(torch.randint(0, 64, (2, 6)))
    (logits.sum() + sum(model.router_losses().values())).backward()
    assert model.moe_layers()[0].router.gate.weight.grad is not None


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"router": "hash"}, r"router='hash' is not supported; allowed routers: softmax_topk, sigmoid_topk, "
                         r"noisy_topk, expert_choice, sinkhorn"),
    ({"route_scale": 0.0}, r"route_scale=0.0 must be a finite number > 0"),
    ({"route_scale": float("nan")}, r"route_scale=nan must be a finite number > 0"),
    ({"router": "sinkhorn", "sinkhorn_iterations": 0}, r"sinkhorn_iterations=0 must be an integer >= 1"),
    ({"num_shared_experts": -1}, r"num_shared_experts=-1 must be an integer >= 0"),
    ({"num_shared_experts": 1, "shared_ffn_hidden_size": 0},
     r"shared_ffn_hidden_size=0 must be a positive integer, or None"),
    ({"router": "expert_choice", "capacity_factor": -1.0}, r"capacity_factor=-1.0 must be > 0"),
    ({"bias_update_rate": 0.1}, r"unknown option\(s\) bias_update_rate .*allowed options: router"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        create_moe("base", H, E, 2, Fh, **options)


@pytest.mark.parametrize("override, match", [
    ("moe.router=hash",
     r"'moe\.router' = 'hash' .*softmax_topk, sigmoid_topk, noisy_topk, expert_choice, sinkhorn"),
    ("moe.num_shared_experts=-1", r"'moe\.num_shared_experts' = -1 .*>= 0"),
    ("moe.shared_ffn_hidden_size=0", r"'moe\.shared_ffn_hidden_size' = 0 .*positive integer, or None"),
    ("moe.bias_update_rate=-0.5", r"'moe\.bias_update_rate' = -0\.5 .*>= 0"),
    ("moe.route_scale=0", r"'moe\.route_scale' = 0\.0 .*finite number > 0"),
    ("moe.sinkhorn_iterations=0", r"'moe\.sinkhorn_iterations' = 0 .*>= 1"),
])
def test_config_validation(override, match):
    with pytest.raises(ValueError, match=match):
        load_job(None, [override])


def test_config_router_choices_are_the_routers():
    for name in ROUTERS:
        assert load_job(None, [f"moe.router={name}"]).moe.router == name
    cfg = load_config(None, ["moe.router=expert_choice", "moe.num_shared_experts=1",
                             "moe.bias_update_rate=0.01"])
    moe = cfg.moe
    assert (moe.router, moe.num_shared_experts, moe.bias_update_rate) == ("expert_choice", 1, 0.01)
