"""A job that starts from a pretrained Hugging Face model (`model.init_from_hf`, docs/retrofit.md):
the model's architecture and tokenizer fill the keys the user left alone, and keys the user set to
something else are an error naming both values.

The HF values are a layer between the defaults and the YAML / overrides (defaults <- HF <- YAML <-
CLI), so a key the user did not set takes the model's value and a key the user set wins; the
architecture keys must then still equal the model's. This is why the layering is redone here rather
than the filled config patched: a key set to its default value is still the user's.
"""

from __future__ import annotations

from typing import Optional

from pikv.config import JobConfig, merge_config
from pikv.data import load_tokenizer
from pikv.models.hf import HF_KEYS, hf_model_config, load_hf_config
from pikv.models.pretrained import resolve_pretrained


def _check_architecture(cfg: JobConfig, arch: dict, spec: str) -> None:
    for key, hf_value in arch.items():
        value = getattr(cfg.model, key)
        # max_seq_len may be lower: RoPE has no learned positions, a shorter table is the same model
        if value > hf_value if key == "max_seq_len" else value != hf_value:
            allowed = f"<= {hf_value}" if key == "max_seq_len" else f"{hf_value!r}"
            raise ValueError(f"config key 'model.{key}' = {value!r} disagrees with {HF_KEYS[key]}={hf_value!r} in "
                             f"the config of model.init_from_hf={spec!r}; leave it unset or set it to {allowed}")
    moe_layers = cfg.moe.layers if cfg.moe.layers is not None else cfg.moe.every_n_layers
    if moe_layers and cfg.model.expert_ffn_hidden_size != arch["ffn_hidden_size"]:
        raise ValueError(f"config key 'model.expert_ffn_hidden_size' = {cfg.model.expert_ffn_hidden_size} disagrees "
                         f"with intermediate_size={arch['ffn_hidden_size']} of model.init_from_hf={spec!r}: "
                         "upcycling makes every expert a copy of the model's FFN")


def pretrained_job(cfg: JobConfig, path: Optional[str], overrides: Optional[list[str]]) -> JobConfig:
    """`cfg` (merged from `path` and `overrides`, model.init_from_hf set) merged again on top of the
    pretrained model's architecture, with data.tokenizer defaulting ('bpe') to the model; ValueError
    naming the key when a set key disagrees with the model, or another tokenizer has another vocabulary."""
    spec = cfg.model.init_from_hf
    model_path = resolve_pretrained(spec, cache_dir=cfg.data.cache_dir)
    arch = hf_model_config(load_hf_config(model_path), f"model.init_from_hf={spec!r}")
    # Dense FFNs unless the user asks for MoE layers; experts then start as the model's FFN (upcycling).
    base = {"model": {**arch, "expert_ffn_hidden_size": arch["ffn_hidden_size"]}, "moe": {"every_n_layers": 0}}
    out = merge_config(path, overrides, base)
    _check_architecture(out, arch, spec)
    if out.data.tokenizer == "bpe":  # a freshly trained BPE cannot feed a pretrained embedding
        out.data.tokenizer = str(model_path)
    elif out.data.tokenizer != str(model_path):
        size = load_tokenizer(out.data.tokenizer).get_vocab_size()
        if size != arch["vocab_size"]:
            raise ValueError(f"config key 'data.tokenizer' = {out.data.tokenizer!r} has {size} tokens, the model of "
                             f"model.init_from_hf={spec!r} {arch['vocab_size']} (vocab_size); leave data.tokenizer "
                             "unset to use the model's own tokenizer")
    return out
