from pathlib import Path

import pytest

from pikv.config import JobConfig, from_dict, load_config, moe_layer_indices, save_yaml, to_dict


def test_defaults_are_the_tiny_cpu_model():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg.train.engine == "torch" and cfg.train.resume == "auto"
    assert cfg.model.num_experts == 8 and cfg.model.top_k == 2


def test_yaml_then_dotlist_overrides_win(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n  lr: 0.5\nmodel:\n  num_layers: 3\n")
    cfg = load_config(str(path), ["train.max_steps=9", "moe.layers=[0,2]"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.model.num_layers) == (9, 0.5, 3)
    assert moe_layer_indices(cfg.model, cfg.moe) == [0, 2]


@pytest.mark.parametrize("override, match", [
    ("model.nonexistent=1", r"model\.nonexistent"),
    ("nosection.x=1", r"nosection"),
    ("model.hidden_size=abc", r"model\.hidden_size.*'abc'"),
    ("model.num_heads=5", r"'model\.num_heads' = 5 .*must divide model\.hidden_size=192"),
    ("model.num_kv_heads=4", r"'model\.num_kv_heads' = 4 .*must divide model\.num_heads=6"),
    ("model.top_k=9", r"'model\.top_k' = 9 .*<= model\.num_experts=8"),
    ("logging.wandb_mode=loud", r"'logging\.wandb_mode' = 'loud'.*online, offline, disabled"),
    ("train.engine=jax", r"'train\.engine' = 'jax'.*allowed values are torch"),
    ("train.resume=/no/such/ckpt", r"'train\.resume' = '/no/such/ckpt'.*auto, never"),
    ("parallel.expert_parallel_size=3", r"'parallel\.expert_parallel_size' = 3 .*divide model\.num_experts=8"),
    ("data.seq_len=4096", r"'data\.seq_len' = 4096 .*<= model\.max_seq_len=256"),
    ("moe.layers=[9]", r"'moe\.layers'.*\[0, 4\)"),
    ("train.max_steps=0", r"'train\.max_steps' = 0 .*> 0"),
    ("bare-word", r"not of the form key\.sub=value"),
])
def test_bad_values_fail_with_key_value_and_allowed(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_or_bad_yaml_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sizee: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*model\.hidden_sizee"):
        load_config(str(bad))


def test_round_trip_through_dict_and_yaml(tmp_path: Path):
    cfg = load_config(None, ["train.run_name=x", "moe.capacity_factor=1.25"])
    assert from_dict(to_dict(cfg)) == cfg
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_moe_layer_selection():
    cfg = load_config(None, ["moe.every_n_layers=2"])
    assert moe_layer_indices(cfg.model, cfg.moe) == [1, 3]
    cfg = load_config(None, ["moe.every_n_layers=0"])
    assert moe_layer_indices(cfg.model, cfg.moe) == []
