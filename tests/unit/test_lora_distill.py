"""PiKV MoE (LoRA experts), upcycling and knowledge distillation (pikv/moe/lora.py,
pikv/training/upcycle.py, pikv/training/distill.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pikv.config import DistillConfig, KVConfig, ModelConfig, MoEConfig, TrainConfig
from pikv.tasks import load_job
from pikv.models import Transformer
from pikv.models.parallelize import shard_experts
from pikv.moe import ROUTERS, GroupedExperts, LoRAMoELayer, create_moe, merge_adapters
from pikv.moe.distill import kd_loss
from pikv.training.distill import Distiller, check_same_tokenizer, load_teacher, parameter_report
from pikv.training.hooks import DistillHook, MicroBatch, combine
from pikv.training.optim import build_optimizer
from pikv.training.upcycle import upcycle

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
            expert_ffn_hidden_size=48, num_experts=4, top_k=2, max_seq_len=16)


def _models(share_base=False, router="softmax_topk"):
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(**TINY), MoEConfig(every_n_layers=0))
    student = Transformer(ModelConfig(**TINY), MoEConfig(kind="pikv", lora_rank=4, share_base=share_base,
                                                         router=router))
    return teacher, student


def _randomize_adapters(layer):
    with torch.no_grad():
        for n, p in layer.experts.named_parameters():
            if n.startswith("lora_b"):
                p.normal_(std=0.3)


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


@pytest.mark.parametrize("share_base", [False, True])
def test_lora_expert_equals_base_plus_low_rank_update(share_base):
    torch.manual_seed(0)
    layer = create_moe("pikv", 16, 4, 2, 24, rank=3, alpha=6.0, share_base=share_base)
    _randomize_adapters(layer)
    ex = layer.experts
    counts_E = torch.tensor([3, 0, 5, 2])
    x_NH = torch.randn(12, 16)  # last 2 rows: dropped slots -> 0
    y_NH = ex(x_NH, counts_E)
    if share_base:
        b = layer.base_ffn
        bases = [(b.gate_proj.weight.T, b.up_proj.weight.T, b.down_proj.weight.T)] * 4
    else:
        bases = [(ex.w1_EHF[e], ex.w3_EHF[e], ex.w2_EFH[e]) for e in range(4)]
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        # scale = alpha / rank = 2; the update of each weight is A_e @ B_e
        w = [base + 2.0 * getattr(ex, a)[e] @ getattr(ex, bb)[e] for base, (a, bb) in zip(bases[e], (
            ("lora_a1_EHR", "lora_b1_ERF"), ("lora_a3_EHR", "lora_b3_ERF"), ("lora_a2_EFR", "lora_b2_ERH")))]
        torch.testing.assert_close(y_NH[start:start + n], _swiglu(x_NH[start:start + n], *w), atol=1e-5, rtol=1e-5)
        start += n
    assert y_NH[start:].abs().max() == 0


@pytest.mark.parametrize("router", ROUTERS)
def test_lora_layer_trains_with_every_router(router):
    torch.manual_seed(0)
    layer = create_moe("pikv", 16, 4, 2, 24, rank=2, router=router, share_base=router == "sinkhorn")
    y = layer(torch.randn(2, 8, 16))
    (y.square().mean() + layer.aux_loss).backward()
    b_grads = [p.grad for n, p in layer.experts.named_parameters() if n.startswith("lora_b")]
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads)  # B = 0 still gets a gradient
    assert all(p.grad is None for p in layer.base_parameters())


def test_create_moe_pikv_options_and_errors():
    layer = create_moe("pikv", hidden_size=64, num_experts=8, top_k=2, rank=16, alpha=1.0, use_distillation=True)
    assert isinstance(layer, LoRAMoELayer) and layer.experts.scale == 1.0 / 16
    # frozen base: only router and adapters train
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"router.gate.weight"} | {n for n, _ in layer.named_parameters() if ".lora_" in n}
    with pytest.raises(ValueError, match="rank=0 must be a positive integer"):
        create_moe("pikv", 64, 8, 2, rank=0)
    with pytest.raises(ValueError, match=r"rank=100 must be <= min\(hidden_size, ffn_hidden_size\)=64"):
        create_moe("pikv", 64, 8, 2, rank=100)
    with pytest.raises(ValueError, match="alpha=-1.0 must be a finite number > 0"):
        create_moe("pikv", 64, 8, 2, alpha=-1.0)
    with pytest.raises(ValueError, match="unknown option.*lora_rank.*allowed options: rank, alpha"):
        create_moe("pikv", 64, 8, 2, lora_rank=4)


@pytest.mark.parametrize("share_base,router",
                         [(False, "softmax_topk"), (True, "softmax_topk"), (False, "sigmoid_topk")])
def test_upcycled_student_equals_teacher_at_step_0(share_base, router):
    teacher, student = _models(share_base, router)
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    before = student(tokens)
    upcycle(student, teacher)
    s, t = student(tokens), teacher(tokens)
    assert (before - t).abs().max() > 1e-2  # the check below is not vacuous
    assert (s - t).abs().max() <= 1e-4  # the stated tolerance (pikv/training/upcycle.py)


def test_upcycle_into_a_student_with_a_kv_compressor():
    teacher, _ = _models()
    student = Transformer(ModelConfig(**TINY), MoEConfig(kind="pikv", lora_rank=4),
                          kv_cfg=KVConfig(compressor="learned"))
    upcycle(student, teacher)  # the teacher has no compressor: the student's keeps its init
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    assert (student(tokens) - teacher(tokens)).abs().max() <= 1e-4  # full cache: compressor unused


def test_upcycle_errors_name_the_mismatch():
    teacher = Transformer(ModelConfig(**{**TINY, "ffn_hidden_size": 40}), MoEConfig(every_n_layers=0))
    _, student = _models()
    with pytest.raises(ValueError, match="FFN width 40 differs from the student's model.expert_ffn_hidden_size=48"):
        upcycle(student, teacher)
    wide = Transformer(ModelConfig(**{**TINY, "hidden_size": 64}), MoEConfig(every_n_layers=0))
    with pytest.raises(ValueError, match=r"model.hidden_size of the checkpoint \(64\) differs"):
        upcycle(student, wide)


def test_upcycle_from_smaller_moe_replicates_experts():
    torch.manual_seed(0)
    small = Transformer(ModelConfig(**{**TINY, "num_experts": 2, "top_k": 1}), MoEConfig())
    _, student = _models()
    upcycle(student, small)
    for s_layer, t_layer in zip(student.moe_layers(), small.moe_layers()):
        for e in range(4):
            torch.testing.assert_close(s_layer.experts.w1_EHF[e], t_layer.experts.w1_EHF[e // 2], rtol=0, atol=0)


def test_frozen_base_gets_no_gradient_and_does_not_change():
    teacher, student = _models()
    upcycle(student, teacher)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen and all(".experts.w" in n for n in frozen)
    opt = build_optimizer(student, TrainConfig(lr=1e-2, weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_opt for p in student.parameters() if not p.requires_grad)
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    adapters = {n: p.detach().clone() for n, p in student.named_parameters() if ".lora_b" in n}
    for _ in range(3):
        loss = F.cross_entropy(student(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, adapters[n]) for n, p in student.named_parameters() if n in adapters)
    report = parameter_report(student)
    assert report["num_frozen_params"] == sum(v.numel() for v in frozen.values())
    assert report["optimizer_state_bytes_saved"] == 8 * report["num_frozen_params"]


@pytest.mark.parametrize("share_base", [False, True])
def test_merged_adapters_give_identical_outputs(share_base):
    _, student = _models(share_base)
    for layer in student.moe_layers():
        _randomize_adapters(layer)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = student(tokens)
        merge_adapters(student)
        after = student(tokens)
    assert all(isinstance(layer.experts, GroupedExperts) and layer.base_ffn is None for layer in student.moe_layers())
    assert torch.equal(before, after)


def test_adapters_shard_with_their_experts():
    layer = create_moe("pikv", 16, 4, 2, 24, rank=3, share_base=True)
    full = {n: p.detach().clone() for n, p in layer.experts.named_parameters()}
    shard_experts(layer, ep_size=2, ep_rank=1)
    for n, p in layer.experts.named_parameters():
        torch.testing.assert_close(p, full[n][2:4], rtol=0, atol=0)
    assert layer.experts.num_experts == 2 and layer.experts.base_weights()[0].shape[0] == 2
    assert all(not p.requires_grad for p in layer.base_ffn.parameters())


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        ps = [math.exp(v / T) for v in s[0, i].tolist()]
        pt = [math.exp(v / T) for v in t[0, i].tolist()]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = T * T * expected / 2  # mean over the 2 tokens
    # rel 1e-6: the reference is float64 Python math, kd_loss runs in fp32 (eps ~1.2e-7 per op)
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_trains_student_and_never_touches_teacher():
    teacher, student = _models()
    upcycle(student, teacher)
    distiller = Distiller(DistillConfig(weight=0.7, temperature=2.0, hidden_layers=[0]), student, teacher,
                          torch.device("cpu"))
    hook = DistillHook(distiller)
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(6):
        logits = student(tokens[:, :-1])
        lm = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss, parts = combine(lm, [hook.loss_terms(MicroBatch(0, tokens[:, :-1], logits, lm))])
        expected = 0.3 * lm + 0.7 * parts["kd_loss"] + parts["hidden_mse"]
        torch.testing.assert_close(loss, expected)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    assert losses[-1] < losses[0]


def test_layer_distillation_against_a_teacher_ffn():
    torch.manual_seed(0)
    layer = create_moe("pikv", 16, 4, 2, 24, rank=2, use_distillation=True, share_base=True)
    teacher_ffn = layer.base_ffn.__class__(16, 24)
    layer.set_teacher(teacher_ffn)
    x = torch.randn(5, 16)
    y = layer(x)
    torch.testing.assert_close(layer.distill_mse, F.mse_loss(y, teacher_ffn(x)))
    assert not any(p is q for p in layer.parameters() for q in teacher_ffn.parameters())
    with pytest.raises(ValueError, match="use_distillation=True"):
        create_moe("pikv", 16, 4, 2, 24, rank=2).set_teacher(teacher_ffn)


def test_tokenizer_mismatch_is_a_clear_error(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "tokenizer.json").write_text('{"vocab": 1}')
    (tmp_path / "student.json").write_text('{"vocab": 2}')
    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_tokenizer(tmp_path / "teacher", tmp_path / "student.json")
    (tmp_path / "student.json").write_text('{"vocab": 1}')
    check_same_tokenizer(tmp_path / "teacher", tmp_path / "student.json")


@pytest.mark.parametrize("overrides,match", [
    (["train.mode=teach"], "'train.mode' = 'teach' is invalid: allowed values are lm, distill"),
    (["moe.kind=lora"], "'moe.kind' = 'lora' is invalid: allowed values are base, pikv"),
    (["train.mode=distill"], "'distill.teacher' = '' is invalid: train.mode=distill needs the teacher's"),
    (["distill.teacher=/nonexistent"], "'distill.teacher' = '/nonexistent' is invalid: is only used with"),
    (["distill.weight=1.5"], r"'distill.weight' = 1.5 is invalid: must be in \[0, 1\]"),
    (["distill.temperature=0"], "'distill.temperature' = 0.0 is invalid: must be a finite number > 0"),
    (["distill.hidden_layers=[9]"], r"'distill.hidden_layers' = \[9\] is invalid: indices must be in \[0, 4\)"),
    (["moe.kind=pikv", "moe.lora_rank=0"], "'moe.lora_rank' = 0 is invalid: must be a positive integer"),
    (["moe.kind=pikv", "moe.lora_rank=300"], r"'moe.lora_rank' = 300 is invalid: must be <= min\(hidden_size, ffn"),
])
def test_config_rejects_bad_distillation_settings(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_job(None, overrides)


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no complete checkpoint there"):
        load_teacher(tmp_path)


def test_layer_api_and_train_mode_distill_compute_the_same_loss():
    # One implementation (pikv/moe/distill.py) behind both paths. On an upcycled student, block 0's
    # MoE input equals the teacher's FFN input, so the layer's own distill_mse (LoRAMoELayer with the
    # teacher's FFN attached) and train.mode=distill's hidden_mse after block 0 (Distiller) compare
    # the same two outputs, the second with the shared residual h added to both.
    teacher, student = _models()
    upcycle(student, teacher)
    _randomize_adapters(student.layers[0].mlp)  # else both are 0
    layer = student.layers[0].mlp
    layer.use_distillation = True  # the trainer's config builds its layers without the layer API's teacher
    layer.set_teacher(teacher.layers[0].mlp)
    distiller = Distiller(DistillConfig(weight=0.5, hidden_layers=[0]), student, teacher, torch.device("cpu"))
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    logits = student.train()(tokens)
    trainer_mse = distiller.losses(tokens, logits)["hidden_mse"]
    assert layer.distill_mse > 1e-4
    # fp32 rounding of (h + a) - (h + b) against a - b, |h| ~ 1: ~1e-7 relative per element
    torch.testing.assert_close(trainer_mse, layer.distill_mse, rtol=1e-5, atol=0)
