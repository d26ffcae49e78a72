"""Load a Hugging Face Llama-family causal LM into a pikv Transformer (dense FFN in every layer), so
PiKV's KV policies run on a real pretrained model (e.g. SmolLM2-135M) next to other libraries.

The pikv Transformer follows the HF Llama layout (RMSNorm, RoPE on the two halves of the head dim,
GQA with repeat_kv, SwiGLU `gate_proj/up_proj/down_proj`), so the weights map by name.
"""

from __future__ import annotations

import torch

from pikv.config import ModelConfig, MoEConfig
from pikv.models import Transformer


def _rope_theta(c) -> float:
    theta = getattr(c, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    scaling = getattr(c, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"rope scaling {scaling} is not supported by the pikv Transformer")
    return float(theta)


def transformer_from_hf_llama(hf_model, max_seq_len: int | None = None, kv_cfg=None) -> Transformer:
    """A pikv Transformer with the weights of an HF LlamaForCausalLM (fp32, eval mode). With
    `kv_cfg` (pikv.config.KVConfig, compressor='learned') every layer also gets a fresh learned KV
    compressor, to be fitted to the frozen model (pikv.kv.fit)."""
    c = hf_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"head_dim {head_dim} * heads {c.num_attention_heads} != hidden {c.hidden_size}")
    cfg = ModelConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                      ffn_hidden_size=c.intermediate_size, max_seq_len=max_seq_len or c.max_position_embeddings,
                      rope_theta=_rope_theta(c), norm_eps=c.rms_norm_eps,
                      tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
    model = Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=kv_cfg)
    state = {}
    for k, v in hf_model.state_dict().items():
        k = k.removeprefix("model.")
        if "rotary_emb" in k:
            continue
        state[k] = v.detach().float()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight") and "kv_compressor" not in m]
    if missing or unexpected:
        raise ValueError(f"HF Llama -> pikv: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def max_logit_difference(hf_model, model: Transformer, tokens_BT: torch.Tensor) -> float:
    """max |logits_hf - logits_pikv| on tokens_BT (the port check)."""
    return float((hf_model(tokens_BT).logits.float() - model(tokens_BT).float()).abs().max())
