"""Hugging Face Llama export of a dense (retrofitted) checkpoint: a tiny HF Llama -> a model.init_from_hf
run with LoRA on the attention and the learned KV compressor -> train/export.py --format hf ->
LlamaForCausalLM.from_pretrained gives the pikv model's logits (LoRA merged, compressor left out),
and the tokenizer's ids. Untied, no LoRA: random weights through the trainer's save_checkpoint."""

import os
import subprocess
import sys

import pytest
import torch

from pikv.data import load_tokenizer
from pikv.export import check_llama_exportable, export_hf
from pikv.inference import stored_config
from pikv.models import Transformer
from pikv.models.lora_linear import merge_lora
from pikv.tasks import load_job
from pikv.training.checkpoint import load_model_weights, read_trainer_state, resolve_checkpoint
from tests.hf_models import tiny_llama, write_texts
from tests.helpers import perturb_weights, save_job_checkpoint
from tests.integration.conftest import REPO

transformers = pytest.importorskip("transformers", reason="HF export tests need transformers")
pytestmark = pytest.mark.slow
# The exported model runs the same fp32 ops as the pikv model with LoRA merged (the port: measured
# 0.0 in tests/unit/test_init_from_hf.py); 1e-5 against logits of magnitude > 1, where a wrong or
# missing weight moves them by O(1).
TOL = 1e-5
# W + s (A B)^T vs x W^T + s (x A) B: the same sum in another fp32 order, measured 1.4e-5 on logits
# of magnitude ~4 (2 layers); a lost adapter (scale s = 2 here) moves them by far more.
MERGED = 1e-4
TEXT = "To be, or not to be: that is the question.<|endoftext|>Next"


@pytest.fixture(scope="module")
def retrofit_run(tmp_path_factory, pikv_cache):
    root = tmp_path_factory.mktemp("llama-export")
    texts = write_texts(root / "texts")
    tiny_llama(root / "model", texts, tie=True)
    args = [f"model.init_from_hf={root / 'model'}", f"data.source={texts}", "data.seq_len=64", "model.lora_rank=4",
            "model.lora_alpha=8", "kv.compressor=learned", "train.freeze=[embed_tokens.*]", "train.max_steps=2",
            "train.checkpoint_every=2", "train.lr=3e-3", "train.warmup_steps=1", "train.eval_every=1000",
            "train.run_name=retro", f"train.output_dir={root / 'runs'}", "logging.wandb_mode=disabled",
            "logging.progress=false"]
    env = {**os.environ, "PIKV_CACHE": pikv_cache, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "train/main.py")] + args, cwd=root, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "runs" / "retro"


def load_llama(out):
    model, info = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits(model, vocab, seed=1):
    tokens = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def test_retrofitted_run_exports_as_llama_with_lora_merged(retrofit_run, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "train/export.py"), "--checkpoint", str(retrofit_run),
                           "--out", str(out), "--format", "hf"], text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = resolve_checkpoint(retrofit_run)
    cfg = stored_config(ckpt, read_trainer_state(ckpt))
    ours = Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv)  # as trained: LoRA adapters and the compressor
    load_model_weights(ckpt, ours)
    assert ours.layers[0].self_attn.kv_compressor is not None
    lora_b = [p for n, p in ours.named_parameters() if n.endswith("lora_b")]
    assert lora_b and all(b.abs().max() > 0 for b in lora_b)  # two steps trained every adapter
    hf = load_llama(out)
    c = hf.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 4, 2, 128)
    assert c.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    theirs = logits(hf, cfg.model.vocab_size)
    unmerged = logits(ours, cfg.model.vocab_size)
    assert theirs.abs().max() > 1.0
    assert (theirs - unmerged).abs().max() <= MERGED  # the adapters' x A B, folded into W
    assert (theirs - logits(merge_lora(ours), cfg.model.vocab_size)).abs().max() <= TOL
    original = transformers.LlamaForCausalLM.from_pretrained(str(retrofit_run.parent.parent / "model")).eval()
    assert (theirs - logits(original, cfg.model.vocab_size)).abs().max() > 1e-3  # the retrofit is exported, not the original

    tok = load_tokenizer(str(retrofit_run / "tokenizer.json"))
    assert transformers.AutoTokenizer.from_pretrained(str(out))(TEXT).input_ids == tok.encode(TEXT).ids


def test_untied_dense_model_without_lora(retrofit_run, tmp_path):
    cfg = load_job(overrides=[f"model.init_from_hf={retrofit_run.parent.parent / 'model'}", "kv.compressor=none",
                              f"data.source={retrofit_run.parent.parent / 'texts'}", "data.seq_len=64"])
    cfg.model.tie_embeddings = False  # the export reads only the checkpoint's config: any dense model
    model = Transformer(cfg.model, cfg.moe)
    perturb_weights(model, seed=5)  # norms too: a dropped or swapped norm shows
    ckpt = save_job_checkpoint(cfg, tmp_path / "ckpt", retrofit_run / "tokenizer.json", lambda: model)
    hf = load_llama(export_hf(ckpt, tmp_path / "hf"))
    assert not hf.config.tie_word_embeddings and hf.lm_head.weight is not hf.model.embed_tokens.weight
    theirs, ours = logits(hf, cfg.model.vocab_size), logits(model.eval(), cfg.model.vocab_size)
    assert theirs.abs().max() > 1.0 and (theirs - ours).abs().max() <= TOL


def test_llama_export_rejects_what_llama_cannot_represent(retrofit_run):
    cfg = load_job(overrides=[f"model.init_from_hf={retrofit_run.parent.parent / 'model'}",
                              f"data.source={retrofit_run.parent.parent / 'texts'}", "data.seq_len=64"])
    cfg.model.rotary_fraction = 0.5
    with pytest.raises(ValueError, match=r"'model.rotary_fraction' = 0.5 cannot be exported: Llama applies RoPE"):
        check_llama_exportable(cfg)
    cfg.model.rotary_fraction, cfg.moe.every_n_layers = 1.0, 1
    with pytest.raises(ValueError, match=r"'moe.every_n_layers' = 1 cannot be exported as LlamaForCausalLM"):
        check_llama_exportable(cfg)
