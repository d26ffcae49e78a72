from pathlib import Path

import pytest

import dataclasses

from pikv.config import OptionError, JobConfig, config_keys, from_dict, load_config, moe_layer_indices, save_yaml, to_dict
from pikv.moe import create_moe
from pikv.tasks import check_job, load_job


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
    """Through load_job, the entry points' loader: the config's own checks and every builder's."""
    with pytest.raises(ValueError, match=match):
        load_job(None, [override])


@pytest.mark.parametrize("override", ["model.num_heads=5", "model.top_k=9", "moe.router=hash", "kv.latent_bits=6"])
def test_builder_rules_live_in_the_builders(override):
    """load_config alone accepts what only a builder rejects: each rule is checked in one place."""
    cfg = load_config(None, [override])
    with pytest.raises(ValueError, match=override.split("=")[0].replace(".", r"\.")):
        check_job(cfg)


def test_a_builder_names_its_argument_and_a_job_its_key():
    with pytest.raises(OptionError, match=r"^top_k=9 must be <= num_experts=8$"):
        create_moe("base", 16, 8, 9, 32)
    with pytest.raises(ValueError, match=r"^config key 'model\.top_k' = 9 is invalid: must be <= model\.num_experts=8$"):
        with config_keys({"top_k": "model.top_k", "num_experts": "model.num_experts"}):
            create_moe("base", 16, 8, 9, 32)
    with pytest.raises(OptionError, match="top_k=9"):  # an argument without a key stays as it is
        with config_keys({"router": "moe.router"}):
            create_moe("base", 16, 8, 9, 32)


def test_kv_budget_check_names_its_arguments_directly():
    from pikv.kv.budgets import check_latent_budgets
    with pytest.raises(OptionError, match=r"^bits=6 must be 4 .*, 8 .* or 16"):
        check_latent_budgets(2, 32, [2.0], 6, 0, 64)
    with pytest.raises(OptionError, match=r"^window=64 must leave every ratios=\[2\.0, 8\.0\] budget a latent"):
        check_latent_budgets(2, 32, [2.0, 8.0], 8, 64, 128)
    check_latent_budgets(2, 32, [2.0, 8.0], 8, 4, 128)  # the default model's shape of budget fits


def test_checking_never_changes_the_config():
    cfg = load_config(None, ["task=time", "kv.compressor=auto"])
    assert cfg.kv.compressor == "none"  # resolved by load_config (pikv.config.resolve), not by a check
    raw = dataclasses.replace(cfg, kv=dataclasses.replace(cfg.kv, compressor="auto"))
    before = to_dict(raw)
    check_job(raw)
    assert to_dict(raw) == before


def test_defaults_that_depend_on_other_keys_are_resolved_and_recorded():
    cfg = load_config(None, ["data.seq_len=64", "kv.train_ratios=[2,8]"])
    assert (cfg.kv.compressor, cfg.kv.latent_window) == ("learned", 4)  # 64 // (2 * 8): half the 8x budget
    assert load_config().kv.latent_window == 8
    assert load_config(None, ["task=flex"]).kv == dataclasses.replace(load_config().kv, compressor="none",
                                                                      latent_window=None)


def test_renamed_key_is_an_error_naming_the_new_key_and_old_checkpoints_migrate(tmp_path: Path):
    with pytest.raises(ValueError, match=r"'kv\.distill_weight' was renamed to 'kv\.attn_error_weight'"):
        load_config(None, ["kv.distill_weight=0.2"])
    path = tmp_path / "old.yaml"
    path.write_text("kv:\n  distill_weight: 0.2\n")
    with pytest.raises(ValueError, match=r"old\.yaml: config key 'kv\.distill_weight' was renamed to 'kv\.attn_error_weight'"):
        load_config(str(path))
    stored = to_dict(load_config())
    stored["kv"]["distill_weight"] = stored["kv"].pop("attn_error_weight") * 2  # a checkpoint from before
    assert from_dict(stored).kv.attn_error_weight == 0.2


def test_resume_accepts_its_modes_and_existing_paths(tmp_path: Path):
    assert load_config(None, ["train.resume=never"]).train.resume == "never"
    assert load_config(None, [f"train.resume={tmp_path}"]).train.resume == str(tmp_path)


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
