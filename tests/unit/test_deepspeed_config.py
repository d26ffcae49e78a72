"""How the DeepSpeed JSON is made from our config and a user file (no DeepSpeed process needed)."""

import json
from pathlib import Path

import pytest

from pikv.config import load_config
from pikv.training.engines.deepspeed_engine import build_ds_config

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"
DS = ["train.engine=deepspeed", "train.batch_size=4", "train.grad_accum_steps=2", "train.grad_clip=0.5"]


def test_generated_from_our_config():
    ds = build_ds_config(load_config(None, DS + ["train.zero_stage=2"]), world_size=2, device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # fp32 on CPU
    assert build_ds_config(load_config(None, DS), 1, "cuda")["bf16"]["enabled"]  # bf16 on CUDA by default


def test_file_fills_what_we_do_not_set_and_equal_values_are_fine(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 123},
                             "gradient_clipping": 0.5, "communication_data_type": "fp32"}))
    ds = build_ds_config(load_config(None, DS + ["train.zero_stage=1", f"train.deepspeed_config={f}"]), 2, "cpu")
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123}
    assert ds["communication_data_type"] == "fp32" and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("content,message", [
    ({"gradient_clipping": 2.0}, r"sets 'gradient_clipping' = 2\.0, but PiKV sets it from train\.grad_clip = 0\.5"),
    ({"zero_optimization": {"stage": 2}}, r"sets 'zero_optimization\.stage' = 2, but PiKV sets it from "
                                          r"train\.zero_stage = 0"),
    ({"train_micro_batch_size_per_gpu": 8}, r"from train\.batch_size = 4"),
    ({"optimizer": {"type": "AdamW"}}, r"has a 'optimizer' section: PiKV builds AdamW"),
])
def test_file_conflicting_with_our_config_is_an_error(tmp_path, content, message):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"config key 'train\.deepspeed_config' = '{f}'.*{message}"):
        build_ds_config(load_config(None, DS + [f"train.deepspeed_config={f}"]), 2, "cpu")


@pytest.mark.parametrize("overrides,message", [
    (["train.engine=deepspeed", "train.zero_stage=3", "parallel.expert_parallel_size=2"],
     r"'train\.zero_stage' = 3 is invalid: ZeRO-3 cannot be combined with parallel\.expert_parallel_size=2"),
    (["train.engine=deepspeed", "train.zero_stage=4"], r"'train\.zero_stage' = 4 is invalid: allowed values are 0, 1, 2, 3"),
    (["train.zero_stage=1"], r"'train\.zero_stage' = 1 is invalid: needs train\.engine=deepspeed"),
    (["train.dtype=fp16"], r"'train\.dtype' = 'fp16' is invalid: fp16 .* needs train\.engine=deepspeed"),
    (["train.engine=deepspeed", "train.deepspeed_config=/nonexistent.json"],
     r"'train\.deepspeed_config' = '/nonexistent\.json' is invalid: must be an existing DeepSpeed JSON file"),
    (["train.max_nonfinite_steps=-1"], r"'train\.max_nonfinite_steps' = -1 is invalid"),
])
def test_invalid_engine_settings_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_shipped_example_file_is_accepted():
    ds = build_ds_config(load_config(None, ["train.engine=deepspeed", "train.zero_stage=2",
                                            f"train.deepspeed_config={EXAMPLE}"]), 2, "cpu")
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is False
