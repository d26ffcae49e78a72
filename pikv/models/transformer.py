"""Decoder-only transformer with GQA attention, RoPE and dense-SwiGLU or MoE feed-forwards.

Shapes: B batch, T new tokens, S attended (cached + new) tokens, H hidden, V vocab, N query
heads, G kv heads, D head dim, F FFN hidden.
Llama / Mixtral conventions throughout (module names, RoPE on the two halves of the head dim,
bias-free linears, fp32 RMSNorm) so an export to Hugging Face Mixtral can match logits exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pikv.config import (ModelConfig, MoEConfig, OptionError, config_keys, default_latent_window, invalid_key,
                         moe_layer_indices)
from pikv.kv.cache import KVCache
from pikv.kv.learned import LatentKVCompressor, attention_error, latent_rank, latent_rotary_dims
from pikv.models.lora_linear import apply_lora
from pikv.models.moe_model import MoEModel
from pikv.moe import FeedForward, check_moe, create_moe


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype: HF LlamaRMSNorm, bitwise.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_dims(head_dim: int, fraction: float) -> int:
    """How many leading dims of each head RoPE rotates: fraction * head_dim, which must be an even
    whole number >= 2 (a pair of dims per frequency); OptionError on `fraction` otherwise."""
    rot = round(fraction * head_dim)
    if not 0 < fraction <= 1 or abs(fraction * head_dim - rot) > 1e-6 or rot % 2 or rot < 2:
        raise OptionError("fraction", fraction, f"must be k / {head_dim} (head dim {head_dim}) for an even k "
                          f"in [2, {head_dim}]: an even whole number of rotated dims, e.g. "
                          f"{2 / head_dim:g}, 0.5 or 1.0")
    return rot


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the HF Llama layout: dims i and i + R/2 form a rotated pair.

    Partial rotary (GPT-NeoX rotary_pct, HF partial_rotary_factor; transformers'
    gpt_neox apply_rotary_pos_emb): only the first R = fraction * D dims of a head rotate, with
    frequencies theta^(-2i/R) over those R dims; the other D - R dims pass through position-free.
    Every RoPE in pikv (queries, keys, the low-rank caches' re-rotated keys) goes through forward().
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, fraction: float = 1.0):
        super().__init__()
        self.rotary_dims = R = rotary_dims(head_dim, fraction)
        inv_freq = 1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
        freqs_TR2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb_TR = torch.cat((freqs_TR2, freqs_TR2), dim=-1)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("cos_TR", emb_TR.cos(), persistent=False)
        self.register_buffer("sin_TR", emb_TR.sin(), persistent=False)

    def forward(self, x_BNTD: torch.Tensor, start: int) -> torch.Tensor:
        """x [..., T, D] at positions start .. start + T - 1 -> the same shape, rotated."""
        T = x_BNTD.shape[-2]
        return self._rotate(x_BNTD, self.cos_TR[start:start + T], self.sin_TR[start:start + T])

    def at_positions(self, x_BHSD: torch.Tensor, pos_BHS: torch.Tensor) -> torch.Tensor:
        """x [B, H, S, D] rotated at arbitrary positions [B, H, S] (a cache's kept tokens after
        evictions; pikv/kv/attention.py rotate_at)."""
        return self._rotate(x_BHSD, self.cos_TR[pos_BHS], self.sin_TR[pos_BHS])

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin, R = cos.to(x.dtype), sin.to(x.dtype), self.rotary_dims
        if R == x.shape[-1]:  # full rotary: no split, no copy (bit-identical to the Llama path)
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., :R], x[..., R:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def model_rope(cfg: ModelConfig) -> RotaryEmbedding:
    """The RoPE of a model config (every model built from ModelConfig uses this one)."""
    return RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta, cfg.rotary_fraction)


class Attention(nn.Module):
    """Grouped-query attention (kv head g serves query heads g*N/G .. (g+1)*N/G - 1, HF repeat_kv)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kv_latent_rank: Optional[int] = None,
                 kv_latent_bits: int = 16, kv_latent_window: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # The jointly trained KV compressor (pikv/kv/learned.py); inactive unless its rank is set.
        # Its init draws from a forked RNG, so the model's own initial weights do not depend on
        # whether (or at which rank) it exists: runs with and without it start from the same model.
        self.kv_compressor = None
        if kv_latent_rank:
            with torch.random.fork_rng(devices=[]):
                self.kv_compressor = LatentKVCompressor(self.num_kv_heads, self.head_dim, kv_latent_rank,
                                                        kv_latent_bits, kv_latent_window, latent_rotary_dims(cfg))
        self.kv_train_state = None  # its training mode (pikv/kv/learned.py KVTrainState), set by the trainer

    def forward(self, x_BTH: torch.Tensor, rope: RotaryEmbedding, start: int,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q_BNTD = self.q_proj(x_BTH).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGTD = self.k_proj(x_BTH).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTD = self.v_proj(x_BTH).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        comp, kv = self.kv_compressor, self.kv_train_state
        rank = kv.rank if kv is not None else None  # None: full K/V
        k_pre_BGTD = k_BGTD
        q_BNTD, k_BGTD = rope(q_BNTD, start), rope(k_BGTD, start)
        if cache is None:
            if rank is not None and kv.through_latent:
                # Train / score through the latent: keys and values round-trip at `rank` (as the cache holds them).
                k_lat_BGTD, v_lat_BGTD = comp.reconstruct(k_pre_BGTD, k_BGTD, v_BGTD, rank, rope, start)
                o_BNTD = comp.attention(q_BNTD, k_lat_BGTD, v_lat_BGTD, k_BGTD, v_BGTD)
                if self.training:
                    with torch.no_grad():  # distillation target: the same attention over the full K/V
                        o_ref = F.scaled_dot_product_attention(q_BNTD, k_BGTD, v_BGTD, is_causal=True,
                                                               enable_gqa=True)
                    # Its gradient reaches the model too: that keeps the full and compressed modes consistent.
                    kv.record(self.layer_idx, attention_error(o_BNTD, o_ref))
            else:
                o_BNTD = F.scaled_dot_product_attention(q_BNTD, k_BGTD, v_BGTD, is_causal=True,
                                                        enable_gqa=True)
                if rank is not None and self.training:
                    # distillation-only step: the model used the full K/V, the latent learns on the side
                    kv.record(self.layer_idx,
                              comp.side_attn_error(q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, o_BNTD, rope, start, rank))
        else:  # the one cache path, whatever its storage and selection (pikv/kv/cache.py)
            o_BNTD = cache.attend(self.layer_idx, q_BNTD, k_BGTD, v_BGTD, k_pre_BGTD=k_pre_BGTD,
                                  rope=rope, start=start)
        return self.o_proj(o_BNTD.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


# create_moe argument -> the config key it comes from: one table builds the arguments and names
# the key when a builder rejects one (kind 'pikv' adds the LoRA options).
MOE_ARG_KEYS = {"hidden_size": "model.hidden_size", "num_experts": "model.num_experts", "top_k": "model.top_k",
                "ffn_hidden_size": "model.expert_ffn_hidden_size", "router": "moe.router",
                "renormalize": "moe.renormalize", "capacity_factor": "moe.capacity_factor",
                "num_shared_experts": "moe.num_shared_experts", "shared_ffn_hidden_size": "moe.shared_ffn_hidden_size",
                "route_scale": "moe.route_scale", "sinkhorn_iterations": "moe.sinkhorn_iterations"}
LORA_ARG_KEYS = {"rank": "moe.lora_rank", "alpha": "moe.lora_alpha", "freeze_base": "moe.freeze_base",
                 "share_base": "moe.share_base"}
MODEL_MOE_KINDS = ("base", "pikv")  # moe.kind of the LM; 'flex' and 'time' are their tasks' models


def moe_arg_keys(kind: str) -> dict[str, str]:
    return {**MOE_ARG_KEYS, **(LORA_ARG_KEYS if kind == "pikv" else {})}


def moe_arguments(cfg: ModelConfig, moe_cfg: MoEConfig, args: Optional[tuple[str, ...]] = None) -> dict:
    """create_moe's arguments (all but kind) from the config; `args` picks a subset."""
    sections = {"model": cfg, "moe": moe_cfg}
    keys = moe_arg_keys(moe_cfg.kind)
    return {a: getattr(sections[k.split(".")[0]], k.split(".")[1]) for a, k in keys.items()
            if args is None or a in args}


def check_transformer(cfg: ModelConfig, moe_cfg: MoEConfig, kinds: tuple[str, ...] = MODEL_MOE_KINDS) -> list[int]:
    """The rules of `Transformer(cfg, moe_cfg)` (attention shapes, MoE layers and their options),
    without building it; ValueError naming the config key. Returns the MoE layer indices."""
    for key in ("hidden_size", "num_heads", "num_kv_heads"):
        if getattr(cfg, key) <= 0:
            invalid_key(f"model.{key}", getattr(cfg, key), "must be > 0")
    if cfg.hidden_size % cfg.num_heads:
        invalid_key("model.num_heads", cfg.num_heads, f"must divide model.hidden_size={cfg.hidden_size}")
    if (cfg.hidden_size // cfg.num_heads) % 2:
        invalid_key("model.num_heads", cfg.num_heads,
                    f"head dim hidden_size/num_heads={cfg.hidden_size // cfg.num_heads} must be even (RoPE)")
    with config_keys({"fraction": "model.rotary_fraction"}):
        rotary_dims(cfg.hidden_size // cfg.num_heads, cfg.rotary_fraction)
    if cfg.num_heads % cfg.num_kv_heads:
        invalid_key("model.num_kv_heads", cfg.num_kv_heads, f"must divide model.num_heads={cfg.num_heads}")
    moe_layers = moe_layer_indices(cfg, moe_cfg)
    if moe_layers:
        if moe_cfg.kind not in kinds:
            invalid_key("moe.kind", moe_cfg.kind, f"allowed values are {', '.join(kinds)}")
        with config_keys(moe_arg_keys(moe_cfg.kind)):
            check_moe(moe_cfg.kind, **moe_arguments(cfg, moe_cfg))
    return moe_layers


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int, is_moe: bool,
                 moe_deterministic: bool = False, kv_latent_rank: Optional[int] = None, kv_latent_bits: int = 16,
                 kv_latent_window: int = 0):
        super().__init__()
        self.is_moe = is_moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx, kv_latent_rank, kv_latent_bits, kv_latent_window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if is_moe:
            self.mlp = create_moe(moe_cfg.kind, **moe_arguments(cfg, moe_cfg), deterministic=moe_deterministic)
        else:
            self.mlp = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x_BTH, rope, start, cache=None):
        x_BTH = x_BTH + self.self_attn(self.input_layernorm(x_BTH), rope, start, cache)
        return x_BTH + self.mlp(self.post_attention_layernorm(x_BTH))


class Transformer(MoEModel):
    """embed -> N x [RMSNorm, attention, +, RMSNorm, FFN or MoE, +] -> RMSNorm -> LM head.

    MoE layers are those of `moe_layer_indices(cfg, moe_cfg)`; moe_deterministic fixes router
    tie-breaking (parity tests).
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: Optional[MoEConfig] = None, *,
                 moe_deterministic: bool = False, kv_cfg=None):
        super().__init__()
        moe_cfg = moe_cfg if moe_cfg is not None else MoEConfig()
        moe_layers = check_transformer(cfg, moe_cfg)
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = model_rope(cfg)
        # kv_cfg (pikv.config.KVConfig) with compressor='learned' adds the jointly trained KV latent.
        kv_rank, kv_bits, kv_window = None, 16, 0
        if kv_cfg is not None and kv_cfg.compressor == "learned":
            kv_bits, kv_window = kv_cfg.latent_bits, kv_cfg.latent_window
            if kv_window is None:  # a KVConfig that did not pass through pikv.config.resolve
                kv_window = default_latent_window(cfg.max_seq_len, kv_cfg.train_ratios)
            # sized without the exact window, the largest rank any sequence length can ask for
            kv_rank = latent_rank(cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads, min(kv_cfg.train_ratios), kv_bits,
                                  rotary_dims=latent_rotary_dims(cfg))
        self.layers = nn.ModuleList(
            Block(cfg, moe_cfg, i, i in moe_layers, moe_deterministic, kv_rank, kv_bits, kv_window)
            for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()
        if cfg.lora_rank:  # after the init: the base weights are those of the model without adapters
            apply_lora(self, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std); residual-output projections (o_proj, down_proj, expert w2) get
        init_std / sqrt(2 * num_layers) (GPT-2 / nanoGPT), RMSNorm weights 1."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if "kv_compressor" in name:  # keeps its own orthogonal init (pikv/kv/learned.py)
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "w2_EFH"):
                module.reset_parameters(std=std, out_std=out_std)

    def set_kv_train_state(self, state) -> None:
        """Hand every attention layer the compressors' training mode (KVTrainState; None: full K/V)."""
        for block in self.layers:
            block.self_attn.kv_train_state = state

    def forward(self, tokens_BT: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """tokens_BT int64 -> logits_BTV; with a cache, positions continue from cache.seq_len."""
        return self.lm_head(self.norm(self.hidden_states(tokens_BT, cache)))

    def hidden_states(self, tokens_BT: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The last block's output, before the final norm and the LM head (what KV calibration and
        compressor fitting need: pikv/kv/fit.py)."""
        start = cache.seq_len if cache is not None else 0
        if start + tokens_BT.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + tokens_BT.shape[1]} (cached {start} + new "
                             f"{tokens_BT.shape[1]}) exceeds max_seq_len={self.cfg.max_seq_len}")
        x_BTH = self.embed_tokens(tokens_BT)
        for block in self.layers:
            x_BTH = block(x_BTH, self.rope, start, cache)
        return x_BTH

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, for MFU: 6 * N + 12 * L * H * seq_len.

        PaLM (Chowdhery et al. 2022, app. B) / nanoGPT convention: N = active non-embedding
        params, where the input embedding lookup is excluded but the LM head matmul counts
        (tied: the shared matrix is counted once, as the head, as nanoGPT does); the second term
        is attention's QK^T and AV matmuls (forward + backward).
        """
        n = self.num_active_params()
        if not self.cfg.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return 6.0 * n + 12.0 * self.cfg.num_layers * self.cfg.hidden_size * seq_len

    def generate(self, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 **kv) -> torch.Tensor:
        """See pikv.models.generation.generate (kv: cache=, kv_policy=, kv_ratio=, kv_tokens=)."""
        from pikv.models.generation import generate
        return generate(self, prompt_BT, max_new_tokens, temperature, top_k, generator, **kv)
