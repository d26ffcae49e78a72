import math

import pytest
import torch

from pikv.config import load_config
from pikv.training.optim import build_optimizer, set_lr
from pikv.training.schedule import lr_at
from pikv.training.throughput import ThroughputMeter, measure_matmul_peak


def test_schedule_warmup_then_cosine_to_floor():
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_steps=10", "train.max_steps=110",
                             "train.min_lr_ratio=0.1"]).train
    assert lr_at(1, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)  # past the end stays at the floor
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, load_config(None, ["train.weight_decay=0.3"]).train)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_deepspeed_split_sees_the_torch_engines_groups_and_empty_groups_are_dropped():
    # the DeepSpeed engine passes its expert-group split (by group name) to the same build_optimizer
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    seen = []

    def split(groups):
        seen.extend((g["name"], g["weight_decay"], len(g["params"])) for g in groups)
        return groups + [{"name": "decay_ep_size_2", "params": [], "weight_decay": 0.3}]

    opt = build_optimizer(model, load_config(None, ["train.weight_decay=0.3"]).train, split)
    assert seen == [("decay", 0.3, 1), ("no_decay", 0.0, 3)]
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    set_lr(opt, 0.125)
    assert {g["lr"] for g in opt.param_groups} == {0.125}


def test_matmul_peak_is_plausible_and_meter_computes_mfu():
    peak = measure_matmul_peak(torch.device("cpu"), n=256, repeats=2)
    assert 1e8 < peak < 1e14
    meter = ThroughputMeter(flops_per_token=1e6, peak_flops=1e9, world_size=2)
    meter.add(1000)
    out = meter.read()
    assert out["tokens_per_s"] > 0
    assert math.isclose(out["mfu"], out["tokens_per_s"] * 1e6 / 2e9, rel_tol=1e-9)
