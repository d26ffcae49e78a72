"""Hugging Face Mixtral export: transformers reproduces PiKV's logits and token ids.

A real `train/main.py` run provides a checkpoint and its tokenizer; further checkpoints with
random weights (norms too, so a dropped or swapped norm shows) go through the same
`save_checkpoint` the trainer calls, tied and untied, in both weight layouts.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pikv.config import load_config
from pikv.data import load_tokenizer
from pikv.export import check_mixtral_exportable, export_hf
from pikv.models import Transformer
from pikv.training.checkpoint import load_model_weights, resolve_checkpoint
from tests.helpers import perturb_weights, save_job_checkpoint
from tests.integration.conftest import REPO, TINY

transformers = pytest.importorskip("transformers", reason="HF export tests need transformers (pip install -e '.[hf]')")

pytestmark = pytest.mark.slow
TOL = 1e-4  # fp32, max abs logit difference
TEXT = "To be, or not to be: that is the question.\n  Whether 'tis nobler (1601) — naïve café!<|endoftext|>Next"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pikv_cache):
    """A 2-step run of the real training job (2 MoE layers, E=4, top-2, GQA 4/2, tied)."""
    cwd = tmp_path_factory.mktemp("hf-run")
    env = {"PIKV_CACHE": pikv_cache, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "train/main.py")] + TINY +
                          ["train.run_name=hf", "train.max_steps=2", "logging.wandb_mode=disabled"],
                          cwd=cwd, env={**os.environ, **env}, text=True, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "runs" / "hf"


def _tiny_cfg(*overrides: str):
    return load_config(None, TINY + list(overrides))


def _save(model: Transformer, cfg, root, tokenizer_file) -> Path:
    """The trainer's save_checkpoint, in a forked world of one (it needs a process group and mesh)."""
    return save_job_checkpoint(cfg, root, tokenizer_file, lambda: model)


def _load_hf(out_dir):
    model, info = transformers.MixtralForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _assert_same_logits(pikv_model: Transformer, hf_model, vocab: int, seq_len: int) -> None:
    tokens = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = pikv_model.eval()(tokens), hf_model(tokens).logits
    assert theirs.shape == ours.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs logit difference {diff:.3g} > {TOL}"


def test_cli_exports_a_trained_run(trained_run, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "train/export.py"), "--checkpoint", str(trained_run),
                           "--out", str(out), "--format", "hf"], text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}

    cfg = _tiny_cfg()
    model = Transformer(cfg.model, cfg.moe)
    load_model_weights(resolve_checkpoint(trained_run), model)
    hf = _load_hf(out)
    c = hf.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (512, 64, 64, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert (c.num_local_experts, c.num_experts_per_tok, c.tie_word_embeddings) == (4, 2, True)
    assert c.rope_parameters["rope_theta"] == cfg.model.rope_theta and c.rms_norm_eps == cfg.model.norm_eps
    assert c.max_position_embeddings == 64 and c.output_router_logits is False
    assert c.router_aux_loss_coef == cfg.moe.aux_loss_weight
    _assert_same_logits(model, hf, 512, 64)

    ours = load_tokenizer(str(trained_run / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    assert theirs(TEXT).input_ids == ours.encode(TEXT).ids
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.token_to_id("<|endoftext|>")
    assert theirs.decode(theirs(TEXT).input_ids) == TEXT


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_random_weights_match_logits(trained_run, tmp_path, tie, layout):
    cfg = _tiny_cfg("model.num_layers=3", "model.num_heads=4", "model.num_kv_heads=1",
                    f"model.tie_embeddings={str(tie).lower()}", "model.rope_theta=500.0", "model.norm_eps=1e-6")
    model = Transformer(cfg.model, cfg.moe)
    perturb_weights(model, seed=3 + tie)
    ckpt = _save(model, cfg, tmp_path / "ckpt", trained_run / "tokenizer.json")
    out = export_hf(ckpt, tmp_path / "hf", layout=layout)
    hf = _load_hf(out)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    _assert_same_logits(model, hf, cfg.model.vocab_size, cfg.model.max_seq_len)


UNSUPPORTED = [  # overrides, "key' = value", why
    (["moe.every_n_layers=2"], r"'moe\.every_n_layers' = 2", r"layers \[0\] are dense"),
    (["moe.layers=[1]"], r"'moe\.layers' = \[1\]", r"layers \[0\] are dense"),
    (["moe.router=sinkhorn"], r"'moe\.router' = 'sinkhorn'", "Mixtral routes with a softmax"),
    (["moe.router=sigmoid_topk"], r"'moe\.router' = 'sigmoid_topk'", "Mixtral routes with a softmax"),
    (["moe.router=expert_choice"], r"'moe\.router' = 'expert_choice'", "Mixtral routes with a softmax"),
    (["moe.renormalize=false"], r"'moe\.renormalize' = False", "Mixtral always renormalises"),
    (["moe.capacity_factor=1.25"], r"'moe\.capacity_factor' = 1\.25", "Mixtral is dropless"),
    (["moe.num_shared_experts=1"], r"'moe\.num_shared_experts' = 1", "Mixtral has no shared experts"),
    (["moe.route_scale=2.5"], r"'moe\.route_scale' = 2\.5", "Mixtral's gate weights are the renormalised"),
]


@pytest.mark.parametrize("overrides,key_value,why", UNSUPPORTED, ids=[o[0] for o, _, _ in UNSUPPORTED])
def test_unsupported_configs_are_rejected(overrides, key_value, why):
    with pytest.raises(ValueError, match=rf"^config key {key_value} cannot be exported: the Hugging Face "
                                         rf"Mixtral layout cannot represent it \({why}"):
        check_mixtral_exportable(_tiny_cfg(*overrides))


def test_cli_rejects_a_dense_layer_checkpoint(trained_run, tmp_path):
    cfg = _tiny_cfg("moe.every_n_layers=2")
    ckpt = _save(Transformer(cfg.model, cfg.moe), cfg, tmp_path / "ckpt", trained_run / "tokenizer.json")
    proc = subprocess.run([sys.executable, str(REPO / "train/export.py"), "--checkpoint", str(tmp_path / "ckpt"),
                           "--out", str(tmp_path / "hf")], text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "config key 'moe.every_n_layers' = 2 cannot be exported" in proc.stderr
    assert "the Hugging Face Mixtral layout cannot represent it" in proc.stderr
    assert ckpt.is_dir() and not (tmp_path / "hf").exists()
