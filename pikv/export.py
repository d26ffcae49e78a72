"""Export a PiKV checkpoint as a Hugging Face model: config.json, model.safetensors and the
tokenizer, so `from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` reproduce PiKV's logits
and token ids. An all-MoE model becomes a Mixtral, a dense one (e.g. a retrofitted Llama,
docs/retrofit.md) a LlamaForCausalLM: LoRA merged, the learned KV compressor left out (HF has no
place for it; the exported model is the retrofitted model with a full cache).

Shapes: E experts, H hidden, F expert FFN hidden.
Mixtral represents exactly one PiKV configuration: every layer MoE, softmax top-k routing with the
k weights renormalised and unscaled, dropless, no shared experts, SwiGLU experts. `check_mixtral_exportable`
rejects anything else with the config key and value, rather than writing a model that loads but
computes something different.

Two weight layouts (`HF_LAYOUTS`):
  fused       transformers >= 5 native: `mlp.experts.gate_up_proj` [E, 2F, H] (gate rows, then up
              rows: MixtralExperts chunks them in that order) and `mlp.experts.down_proj` [E, H, F].
  per_expert  the original Mixtral release / transformers 4.x / vLLM layout:
              `block_sparse_moe.experts.<e>.{w1,w3,w2}.weight` ([F, H], [F, H], [H, F]).
transformers 5 loads both (it converts per_expert at load time); "auto" picks the layout of the
installed transformers' MixtralExperts, which loads with no conversion and no missing/unexpected key.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from pikv.config import JobConfig, from_dict, moe_layer_indices
from pikv.data.tokenizer import EOT, eot_id, load_tokenizer
from pikv.models import Transformer
from pikv.models.hf import hf_llama_state_dict
from pikv.models.lora_linear import merge_lora
from pikv.moe import merge_adapters
from pikv.training.checkpoint import load_model_weights, read_trainer_state, resolve_checkpoint

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HF_LAYOUTS = ("auto", "fused", "per_expert")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CANNOT = "the Hugging Face Mixtral layout cannot represent it"


def _unsupported(key: str, value, why: str) -> ValueError:
    return ValueError(f"config key '{key}' = {value!r} cannot be exported: {_CANNOT} ({why})")


def check_mixtral_exportable(cfg: JobConfig) -> None:
    """Raise ValueError naming the first config key whose value Mixtral cannot represent."""
    m, moe = cfg.model, cfg.moe
    moe_layers = moe_layer_indices(m, moe)
    if moe_layers != list(range(m.num_layers)):
        dense = sorted(set(range(m.num_layers)) - set(moe_layers))
        key, value = ("moe.layers", moe.layers) if moe.layers is not None else ("moe.every_n_layers",
                                                                                  moe.every_n_layers)
        raise _unsupported(key, value, f"layers {dense} are dense; every Mixtral layer is MoE")
    if moe.router != "softmax_topk":
        raise _unsupported("moe.router", moe.router, "Mixtral routes with a softmax over all experts "
                           "then top-k; only moe.router='softmax_topk' is exportable")
    if getattr(m, "rotary_fraction", 1.0) != 1.0:
        raise _unsupported("model.rotary_fraction", m.rotary_fraction,
                           "Mixtral's attention applies RoPE to every dim of a head; only 1.0 is exportable")
    if not moe.renormalize:
        raise _unsupported("moe.renormalize", moe.renormalize,
                           "Mixtral always renormalises the top-k weights to sum to 1")
    if moe.capacity_factor is not None:
        raise _unsupported("moe.capacity_factor", moe.capacity_factor,
                           "Mixtral is dropless; set moe.capacity_factor=null")
    if getattr(moe, "num_shared_experts", 0):
        raise _unsupported("moe.num_shared_experts", moe.num_shared_experts, "Mixtral has no shared experts")
    if getattr(moe, "route_scale", 1.0) != 1.0:
        raise _unsupported("moe.route_scale", moe.route_scale,
                           "Mixtral's gate weights are the renormalised probabilities, unscaled")


def check_llama_exportable(cfg: JobConfig) -> None:
    """Raise ValueError naming a config key LlamaForCausalLM cannot represent (a dense model only)."""
    if moe_layer_indices(cfg.model, cfg.moe):
        raise ValueError(f"config key 'moe.every_n_layers' = {cfg.moe.every_n_layers!r} cannot be exported as "
                         "LlamaForCausalLM: it has MoE layers (an all-MoE model exports as Mixtral)")
    if getattr(cfg.model, "rotary_fraction", 1.0) != 1.0:
        raise ValueError(f"config key 'model.rotary_fraction' = {cfg.model.rotary_fraction!r} cannot be exported: "
                         "Llama applies RoPE to every dim of a head; only 1.0 is exportable")


def llama_config(cfg: JobConfig, eos_token_id: int, dtype: str = "float32") -> dict:
    """config.json contents (LlamaConfig fields) of a dense PiKV model: the inverse of
    pikv.models.hf.hf_model_config (the keys a retrofit run took from its HF model)."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "head_dim": m.hidden_size // m.num_heads, "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "pretraining_tp": 1,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
        "use_cache": True, "dtype": dtype,
    }


def installed_mixtral_layout() -> str:
    """'fused' if the installed transformers stores Mixtral experts as 3-D tensors, else 'per_expert'."""
    if not HAS_TRANSFORMERS:
        raise ValueError("Hugging Face export needs transformers: pip install -e '.[hf]'")
    from transformers.models.mixtral import modeling_mixtral
    return "fused" if hasattr(modeling_mixtral, "MixtralExperts") else "per_expert"


def mixtral_config(cfg: JobConfig, eos_token_id: int, dtype: str = "float32") -> dict:
    """config.json contents (MixtralConfig fields) for a checked PiKV config."""
    m = cfg.model
    head_dim = m.hidden_size // m.num_heads
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.expert_ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std,
        # rope_theta for transformers 4.x, rope_parameters for 5.x (which reads both).
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k,
        "tie_word_embeddings": m.tie_embeddings,
        "router_aux_loss_coef": cfg.moe.aux_loss_weight, "output_router_logits": False,
        "router_jitter_noise": 0.0, "sliding_window": None, "attention_dropout": 0.0,
        # PiKV has one special token, <|endoftext|>, which also starts every packed document.
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
        "use_cache": True, "dtype": dtype,
    }


def mixtral_state_dict(model: Transformer, layout: str = "fused",
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF Mixtral tensor name -> contiguous tensor. A tied LM head is written once (as
    model.embed_tokens.weight): safetensors refuses shared storage and HF re-ties on load."""
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout={layout!r}; allowed: fused, per_expert")
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.detach().to(dtype).contiguous().clone()

    put("model.embed_tokens.weight", model.embed_tokens.weight)
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            put(f"{p}self_attn.{proj}.weight", getattr(block.self_attn, proj).weight)
        put(f"{p}input_layernorm.weight", block.input_layernorm.weight)
        put(f"{p}post_attention_layernorm.weight", block.post_attention_layernorm.weight)
        experts = block.mlp.experts
        # PiKV stores x @ W ([E, in, out]); HF stores nn.Linear weights ([out, in]): transpose.
        w1_EFH, w3_EFH = experts.w1_EHF.transpose(1, 2), experts.w3_EHF.transpose(1, 2)
        w2_EHF = experts.w2_EFH.transpose(1, 2)
        if layout == "fused":
            put(f"{p}mlp.gate.weight", block.mlp.router.gate.weight)
            put(f"{p}mlp.experts.gate_up_proj", torch.cat([w1_EFH, w3_EFH], dim=1))
            put(f"{p}mlp.experts.down_proj", w2_EHF)
        else:
            put(f"{p}block_sparse_moe.gate.weight", block.mlp.router.gate.weight)
            for e in range(experts.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                put(q + "w1.weight", w1_EFH[e])
                put(q + "w3.weight", w3_EFH[e])
                put(q + "w2.weight", w2_EHF[e])
    put("model.norm.weight", model.norm.weight)
    if not model.cfg.tie_embeddings:
        put("lm_head.weight", model.lm_head.weight)
    return out


def export_hf(checkpoint: Path, out_dir: Path, *, layout: str = "auto",
              dtype: str = "float32") -> Path:
    """Write `out_dir`/{config.json, model.safetensors, tokenizer files} from a step_<N> or run
    directory: Mixtral for an all-MoE model, LlamaForCausalLM for a dense one (`layout` is Mixtral's).
    Raises ValueError for an unusable checkpoint or a config neither can represent."""
    if layout not in HF_LAYOUTS:
        raise ValueError(f"--layout {layout!r} is invalid; allowed: {', '.join(HF_LAYOUTS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if not HAS_TRANSFORMERS:
        raise ValueError("Hugging Face export needs transformers: pip install -e '.[hf]'")
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    ckpt = resolve_checkpoint(Path(checkpoint))
    cfg = from_dict(read_trainer_state(ckpt).config)
    dense = not moe_layer_indices(cfg.model, cfg.moe)
    check_llama_exportable(cfg) if dense else check_mixtral_exportable(cfg)
    tok_file = ckpt / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"checkpoint {ckpt} has no tokenizer.json to export")
    eos = eot_id(load_tokenizer(str(tok_file)))
    model = Transformer(cfg.model, cfg.moe)  # no kv_cfg: the compressor's weights are not loaded
    load_model_weights(ckpt, model)
    merge_adapters(model)  # moe.kind=pikv: export each expert's effective weights (no-op otherwise)
    merge_lora(model)  # model.lora_rank > 0: the attention adapters folded into the weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dense:
        config, layout = llama_config(cfg, eos, dtype), "llama"
        state = {k: v.detach().to(DTYPES[dtype]).contiguous().clone()
                 for k, v in hf_llama_state_dict(model.state_dict(), cfg.model.tie_embeddings).items()}
    else:
        layout = installed_mixtral_layout() if layout == "auto" else layout
        config, state = mixtral_config(cfg, eos, dtype), mixtral_state_dict(model, layout, DTYPES[dtype])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "pikv_checkpoint": str(ckpt), "pikv_layout": layout})
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token=EOT)
    hf_tok.save_pretrained(str(out_dir))
    return out_dir


__all__ = ["export_hf", "check_mixtral_exportable", "mixtral_config", "mixtral_state_dict",
           "check_llama_exportable", "llama_config",
           "installed_mixtral_layout", "HAS_TRANSFORMERS", "HF_LAYOUTS"]
