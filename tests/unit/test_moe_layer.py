"""MoE layer vs an independent per-token reference; losses vs hand values; create_moe errors.

Shapes: T tokens, H hidden, E experts, K experts per token, F expert FFN hidden.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pikv.moe import GroupedExperts, MoELayer, create_moe
from tests.unit.test_routers import steer
from tests.helpers import REORDERED_FP32, seeded

H, E, Fh = 16, 4, 32


def reference_moe(x_TH, gate_EH, w1, w3, w2, top_k, renormalize, capacity=None):
    """Plain loops: per token, per chosen expert, in token order; drops past `capacity`."""
    probs_TE = torch.softmax(x_TH @ gate_EH.T, dim=-1)
    top_TK, ids_TK = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    top_TK, ids_TK = top_TK[:, :top_k], ids_TK[:, :top_k]
    if renormalize:
        top_TK = top_TK / top_TK.sum(-1, keepdim=True)
    used, dropped, rows = [0] * gate_EH.shape[0], 0, []
    for t in range(x_TH.shape[0]):
        acc = torch.zeros_like(x_TH[t])
        for k in range(top_k):
            e = int(ids_TK[t, k])
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            h = F.silu(x_TH[t] @ w1[e]) * (x_TH[t] @ w3[e])
            acc = acc + top_TK[t, k] * (h @ w2[e])
        rows.append(acc)
    return torch.stack(rows), dropped, used


def check_against_reference(layer: MoELayer, x_TH: torch.Tensor, capacity=None):
    params = [layer.router.gate.weight, layer.experts.w1_EHF, layer.experts.w3_EHF, layer.experts.w2_EFH]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x1 = x_TH.clone().requires_grad_()
    x2 = x_TH.clone().requires_grad_()
    grad_TH = torch.randn_like(x_TH)
    y = layer(x1)
    (y * grad_TH).sum().backward()
    y_ref, dropped, used = reference_moe(x2, *ref_params, layer.top_k, layer.router.renormalize, capacity)
    (y_ref * grad_TH).sum().backward()
    torch.testing.assert_close(y, y_ref, **REORDERED_FP32)  # the reference adds in per-token order
    torch.testing.assert_close(x1.grad, x2.grad, **REORDERED_FP32)
    for p, r in zip(params, ref_params):
        r_grad = r.grad if r.grad is not None else torch.zeros_like(r)
        torch.testing.assert_close(p.grad, r_grad, **REORDERED_FP32)
    n_slots = x_TH.shape[0] * layer.top_k
    assert round(layer.metrics["dropped_fraction"].item() * n_slots) == dropped
    return dropped, used


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_matches_reference(renormalize, capacity_factor):
    torch.manual_seed(0)
    layer = create_moe("base", H, E, 2, Fh, renormalize=renormalize, capacity_factor=capacity_factor)
    x_TH = torch.randn(24, H)
    capacity = layer.capacity(24)
    if capacity_factor is not None:
        assert capacity == math.ceil(capacity_factor * 24 * 2 / E)
    dropped, _ = check_against_reference(layer, x_TH, capacity)
    if capacity_factor == 0.5:
        assert dropped > 0  # the drop path is really exercised


def test_all_tokens_to_one_expert():
    torch.manual_seed(1)
    layer = create_moe("base", H, E, 1, Fh)
    x_TH = torch.randn(10, H)
    steer(layer, x_TH, hot=2)
    _, used = check_against_reference(layer, x_TH)
    assert used == [0, 0, 10, 0]
    assert layer.metrics["tokens_per_expert"].tolist() == [0, 0, 10, 0]
    assert layer.experts.w1_EHF.grad[[0, 1, 3]].abs().max() == 0


def test_expert_receiving_nothing_with_capacity():
    torch.manual_seed(2)
    layer = create_moe("base", H, 8, 2, Fh, capacity_factor=2.0)
    x_TH = torch.randn(12, H)
    steer(layer, x_TH, hot=3, cold=5)
    dropped, used = check_against_reference(layer, x_TH, layer.capacity(12))
    assert used[3] == min(12, layer.capacity(12)) and used[5] == 0
    assert dropped == 12 - layer.capacity(12)  # expert 3 overflows: 12 slots, capacity 6
    assert layer.metrics["tokens_per_expert"][5] == 0 and layer.metrics["tokens_per_expert"][3] == 12


def test_grouped_mm_path_matches_loop():
    """torch._grouped_mm path (padding, offsets, dropped tail rows) vs the expert loop, on CPU fp32."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    torch.manual_seed(3)
    layer = create_moe("base", H, 8, 2, Fh, capacity_factor=1.0)
    x_TH = torch.randn(20, H)
    steer(layer, x_TH, hot=3, cold=5)  # overflow, an empty expert, unaligned segments
    outs = []
    for grouped in (False, True):
        layer.zero_grad()
        layer.experts.use_grouped_mm = grouped
        x = x_TH.clone().requires_grad_()
        try:
            y = layer(x)
        except RuntimeError as err:
            pytest.skip(f"torch._grouped_mm unsupported on CPU here: {err}")
        (y * torch.linspace(-1, 1, H)).sum().backward()
        outs.append([y, x.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*outs):  # another kernel: the same products summed in another order
        torch.testing.assert_close(a, b, **REORDERED_FP32)


def test_losses_match_hand_values():
    # x = identity, so logits[t, e] = gate.weight[e, t]: the logits are chosen by hand.
    logits = [[2.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.5, 0.0], [0.3, 0.2, 3.0, 0.1], [1.0, 1.5, 0.0, 0.0]]
    layer = create_moe("base", 4, 4, 1, 8)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor(logits).T)
    layer(torch.eye(4))
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    top1 = [row.index(max(row)) for row in logits]  # experts 0, 1, 2, 1
    f = [top1.count(e) / 4 for e in range(4)]
    p_mean = [sum(probs[t][e] for t in range(4)) / 4 for e in range(4)]
    aux = 4 * sum(fe * pe for fe, pe in zip(f, p_mean))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 4
    entropy = -sum(p * math.log(p) for row in probs for p in row) / 4
    # fp32 layer vs float64 Python: a few fp32 ulps (1.2e-7 relative each)
    assert layer.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert layer.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert layer.metrics["router_entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert layer.metrics["tokens_per_expert"].tolist() == [1, 2, 1, 0]
    assert layer.aux_loss.requires_grad and layer.z_loss.requires_grad
    assert not any(m.requires_grad for m in layer.metrics.values())
    (layer.aux_loss + layer.z_loss).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_deterministic_ties_pick_lower_index():
    layer = create_moe("base", H, E, 2, Fh, deterministic=True)
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # every probability ties at 1/E
    _, ids_TK, _, _ = layer.router(torch.randn(5, H, generator=seeded(0)))
    assert ids_TK.tolist() == [[0, 1]] * 5


def test_batched_and_flat_shapes_agree():
    torch.manual_seed(4)
    layer = create_moe("base", H, E, 2, Fh)
    x_BTH = torch.randn(2, 5, H)
    y_BTH = layer(x_BTH)
    assert y_BTH.shape == (2, 5, H)
    torch.testing.assert_close(layer(x_BTH.reshape(10, H)), y_BTH.reshape(10, H))


def test_mixtral_defaults_and_parameter_layout():
    layer = create_moe("base", H, E, 2, Fh)
    assert layer.router.renormalize and layer.capacity_factor is None
    assert layer.router.gate.weight.shape == (E, H) and layer.router.gate.bias is None
    assert isinstance(layer.experts, GroupedExperts)
    shapes = {n: tuple(p.shape) for n, p in layer.experts.named_parameters()}
    assert shapes == {"w1_EHF": (E, H, Fh), "w3_EHF": (E, H, Fh), "w2_EFH": (E, Fh, H)}


@pytest.mark.parametrize("args, options, match", [
    (("vision", H, E, 2, Fh), {}, r"unknown MoE kind 'vision'; allowed kinds: base, .*flex, time"),
    (("base", H, E, 5, Fh), {}, r"top_k=5 must be <= num_experts=4"),
    (("base", H, E, 0, Fh), {}, r"top_k=0 must be a positive integer"),
    (("base", 0, E, 2, Fh), {}, r"hidden_size=0 must be a positive integer"),
    (("base", H, E, 2, -1), {}, r"ffn_hidden_size=-1 must be a positive integer"),
    (("base", H, E, 2, 0), {}, r"ffn_hidden_size=0 must be a positive integer"),  # 0 is not "unset"
    (("base", H, E, 2, Fh), {"jitter": 0.1}, r"unknown option\(s\) jitter .*allowed options: router"),
    (("base", H, E, 2, Fh), {"router": "hash"}, r"router='hash' is not supported; allowed routers: softmax_topk"),
    (("base", H, E, 2, Fh), {"capacity_factor": 0.0}, r"capacity_factor=0.0 must be > 0, or None"),
])
def test_create_moe_errors(args, options, match):
    with pytest.raises(ValueError, match=match):
        create_moe(*args, **options)
