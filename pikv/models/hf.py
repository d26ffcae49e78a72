"""Hugging Face Llama-family models -> pikv Transformer: the architecture (ModelConfig values from the HF
config) and the weights (by name), for training (`model.init_from_hf`) and evaluation alike.

The pikv Transformer follows the HF Llama layout (RMSNorm, RoPE on the two halves of the head dim,
GQA with repeat_kv, SwiGLU `gate_proj/up_proj/down_proj`, bias-free linears), so the weights map by
name. A GGUF file goes through transformers too (`gguf_file=`): it dequantizes to fp32 and undoes
llama.cpp's q/k permutation, so one mapping serves both. Needs transformers (and gguf for .gguf).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pikv.config import ModelConfig, MoEConfig
from pikv.models.transformer import Transformer

# ModelConfig field -> the HF LlamaConfig attribute it comes from (error messages name both).
HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
           "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
           "ffn_hidden_size": "intermediate_size", "max_seq_len": "max_position_embeddings",
           "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
           "rotary_fraction": "partial_rotary_factor"}
SUPPORTED_TYPES = ("llama",)


def _transformers(what: str):
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{what} needs transformers: pip install -e '.[hf]'") from None
    return transformers


def _from_pretrained_args(path: Path) -> tuple[str, dict]:
    """(folder, kwargs) for transformers' from_pretrained: a GGUF file is read with gguf_file=."""
    if path.suffix.lower() == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def _rope_theta(c) -> float:
    theta = getattr(c, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    scaling = getattr(c, "rope_scaling", None) or getattr(c, "rope_parameters", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {scaling} is not supported by the pikv Transformer")
    return float(theta)


def hf_model_config(c, where: str = "model.init_from_hf") -> dict:
    """The ModelConfig values (fields of HF_KEYS) of a transformers Llama config; ValueError naming what
    the pikv Transformer cannot represent (another model type, biases, another activation, rope scaling,
    a head_dim that is not hidden / heads)."""
    if getattr(c, "model_type", None) not in SUPPORTED_TYPES:
        raise ValueError(f"{where}: model type {getattr(c, 'model_type', None)!r} is not supported; "
                         f"allowed: {', '.join(SUPPORTED_TYPES)} (Llama family)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            raise ValueError(f"{where}: {flag}=true is not supported (pikv linears have no bias)")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={c.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"{where}: head_dim {head_dim} * heads {c.num_attention_heads} != hidden {c.hidden_size}")
    values = {key: getattr(c, hf) for key, hf in HF_KEYS.items()
              if key not in ("rope_theta", "tie_embeddings", "rotary_fraction")}
    values["rope_theta"] = _rope_theta(c)
    values["tie_embeddings"] = bool(getattr(c, "tie_word_embeddings", False))
    values["norm_eps"] = float(values["norm_eps"])
    partial = getattr(c, "partial_rotary_factor", None) or (getattr(c, "rope_parameters", None) or {}).get(
        "partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial!r} is not supported (Llama rotates every dim)")
    values["rotary_fraction"] = 1.0  # explicit: PiKV's own default rotates half (schema.py)
    return values


def load_hf_config(path: Path):
    """The transformers config of a model folder or GGUF file."""
    tf = _transformers("model.init_from_hf")
    folder, kwargs = _from_pretrained_args(path)
    try:
        return tf.AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad model
        raise ValueError(f"model.init_from_hf {str(path)!r}: transformers could not read its config: {err}") from err


def load_hf_causal_lm(path: Path):
    """AutoModelForCausalLM of a model folder or GGUF file, fp32, eager attention, eval mode."""
    tf = _transformers("model.init_from_hf")
    if path.suffix.lower() != ".gguf":
        return tf.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                       dtype=torch.float32).eval()
    # from_pretrained(gguf_file=) insists on accelerate for its device placement only; the tensors
    # come from the same reader (dequantized, q/k permutation undone) either way.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = tf.AutoModelForCausalLM.from_config(load_hf_config(path), attn_implementation="eager",
                                                dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"model.init_from_hf {str(path)!r}: GGUF tensors missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def hf_state_dict(hf_model, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The HF model's weights under pikv names (fp32); the LM head is left out when it is tied."""
    state = {}
    for k, v in hf_model.state_dict().items():
        if "rotary_emb" in k:
            continue
        state[k.removeprefix("model.")] = v.detach().float()
    if tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_llama_state_dict(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The inverse of `hf_state_dict`: a dense pikv Transformer's weights (LoRA merged) under HF
    LlamaForCausalLM names. No q/k permutation to undo: the port applies none (transformers' GGUF
    reader already turned llama.cpp's back). The learned KV compressor has no HF counterpart and is
    left out; a tied LM head is the embedding, written once."""
    out = {}
    for name, tensor in state.items():
        if "kv_compressor" in name or (name == "lm_head.weight" and tie_embeddings):
            continue
        out[name if name == "lm_head.weight" else "model." + name] = tensor
    return out


def transformer_from_hf_llama(hf_model, max_seq_len: Optional[int] = None, kv_cfg=None) -> Transformer:
    """A dense pikv Transformer with the weights of an HF LlamaForCausalLM (fp32, eval mode). With
    `kv_cfg` (pikv.config.KVConfig, compressor='learned') every layer also gets a fresh learned KV
    compressor (not in the HF model: it keeps its init)."""
    values = hf_model_config(hf_model.config)
    if max_seq_len is not None:
        values["max_seq_len"] = max_seq_len
    cfg = ModelConfig(**values)
    model = Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=kv_cfg)
    missing, unexpected = model.load_state_dict(hf_state_dict(hf_model, cfg.tie_embeddings), strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight") and "kv_compressor" not in m]
    if missing or unexpected:
        raise ValueError(f"HF Llama -> pikv: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_pretrained_transformer(path: Path, max_seq_len: Optional[int] = None, kv_cfg=None) -> Transformer:
    """`transformer_from_hf_llama` of the model at `path` (folder or GGUF), the HF copy dropped."""
    return transformer_from_hf_llama(load_hf_causal_lm(path), max_seq_len, kv_cfg)


@torch.no_grad()
def max_logit_difference(hf_model, model: Transformer, tokens_BT: torch.Tensor) -> float:
    """max |logits_hf - logits_pikv| on tokens_BT (the port check)."""
    return float((hf_model(tokens_BT).logits.float() - model(tokens_BT).float()).abs().max())
