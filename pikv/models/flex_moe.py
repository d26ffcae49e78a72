"""Flex-MoE (Yun et al., NeurIPS 2024) for M tabular modalities.

  per-modality encoders      an MLP per modality -> one token [H] per modality; a modality's
                             encoder only sees (and is only trained by) samples that have it
  missing-modality bank      a learned [C, M, H] table: a sample with combination c that lacks
                             modality m gets token bank[c, m] (bank=False: the encoder of an
                             all-zero input instead, the zero-filled ablation)
  fused tokens               + a learned modality-type embedding, through L bidirectional
                             transformer blocks whose FFN is the Flex-MoE layer (G-/S-Router,
                             pikv/moe/variants/flex.py) on the MoE layers of moe_layer_indices
  head                       mean over the M tokens -> classifier

Shapes: B samples, D features, M modalities, C combinations, H hidden, K classes.
"""

from __future__ import annotations

import torch
from torch import nn

from pikv.config import FlexConfig, MoEConfig, ModelConfig, config_keys, moe_layer_indices
from pikv.data.multimodal import NUM_COMBOS, check_inputs, combo_index, modality_dims
from pikv.models.moe_model import MoEModel
from pikv.models.transformer import MOE_ARG_KEYS, FeedForward, RMSNorm, moe_arguments
from pikv.moe import check_moe, create_moe


# Flex-MoE's layers take these create_moe arguments from the config (the router is its own G-/S-Router)
_FLEX_ARGS = ("hidden_size", "num_experts", "top_k", "ffn_hidden_size", "renormalize", "num_shared_experts",
              "shared_ffn_hidden_size", "route_scale")


def flex_moe_arguments(cfg: ModelConfig, moe_cfg: MoEConfig, specialized: bool) -> dict:
    return {**moe_arguments(cfg, moe_cfg, _FLEX_ARGS), "num_modalities": len(modality_dims()),
            "specialized_routing": specialized}


def check_flex_moe(cfg: ModelConfig, moe_cfg: MoEConfig, flex_cfg: FlexConfig) -> None:
    """The rules of `FlexMoE(cfg, moe_cfg, flex_cfg)` without building it; ValueError naming the key."""
    if moe_layer_indices(cfg, moe_cfg):
        with config_keys({**MOE_ARG_KEYS, "specialized_routing": "flex.specialized_routing"}):
            check_moe("flex", **flex_moe_arguments(cfg, moe_cfg, flex_cfg.specialized_routing))


class EncoderBlock(nn.Module):
    """Pre-norm block with bidirectional attention (modality tokens have no order)."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, is_moe: bool, specialized: bool,
                 deterministic: bool):
        super().__init__()
        self.is_moe = is_moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, bias=False, batch_first=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if is_moe:
            self.mlp = create_moe("flex", **flex_moe_arguments(cfg, moe_cfg, specialized), deterministic=deterministic)
        else:
            self.mlp = FeedForward(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x_BMH: torch.Tensor, combo_BM: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x_BMH)
        x_BMH = x_BMH + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.post_attention_layernorm(x_BMH)
        return x_BMH + (self.mlp(h, combo_BM) if self.is_moe else self.mlp(h))


class FlexMoE(MoEModel):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, flex_cfg: FlexConfig, num_classes: int = 2,
                 deterministic: bool = False):
        super().__init__()
        H, dims = cfg.hidden_size, modality_dims()
        self.dims = dims
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, H), nn.GELU(), nn.Linear(H, H)) for d in dims)
        self.modality_embed = nn.Parameter(torch.randn(len(dims), H) * cfg.init_std)
        self.bank = nn.Parameter(torch.randn(NUM_COMBOS, len(dims), H) * cfg.init_std) if flex_cfg.bank else None
        moe_ids = moe_layer_indices(cfg, moe_cfg)
        self.layers = nn.ModuleList(EncoderBlock(cfg, moe_cfg, i in moe_ids, flex_cfg.specialized_routing,
                                                 deterministic) for i in range(cfg.num_layers))
        self.norm = RMSNorm(H, cfg.norm_eps)
        self.head = nn.Linear(H, num_classes)
        self.init_weights(cfg.init_std)

    def forward(self, features_BD: torch.Tensor, observed_BM: torch.Tensor) -> torch.Tensor:
        """features_BD float (values of unobserved modalities are ignored), observed_BM bool ->
        class logits [B, K]."""
        check_inputs(features_BD, observed_BM)
        combo_B = combo_index(observed_BM)
        col_mask_BD = observed_BM.repeat_interleave(torch.tensor(self.dims, device=observed_BM.device), dim=1)
        features_BD = features_BD * col_mask_BD  # zero-filled: what the no-bank ablation encodes
        tokens = [enc(x) for enc, x in zip(self.encoders, features_BD.split(self.dims, dim=-1))]
        x_BMH = torch.stack(tokens, dim=1)
        if self.bank is not None:
            x_BMH = torch.where(observed_BM.unsqueeze(-1), x_BMH, self.bank[combo_B].to(x_BMH.dtype))
        x_BMH = x_BMH + self.modality_embed
        combo_BM = combo_B.unsqueeze(1).expand(observed_BM.shape)
        for block in self.layers:
            x_BMH = block(x_BMH, combo_BM)
        return self.head(self.norm(x_BMH).mean(dim=1))
