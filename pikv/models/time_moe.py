"""Time-MoE (Shi et al., ICLR 2025): a decoder-only forecaster over single values.

  point-wise embedding       h_t = SiLU(x_t w_g) * (x_t w_v)  (Time-MoE's gated input embedding)
  causal decoder             PiKV's Blocks (RMSNorm, RoPE, causal GQA attention) whose MoE FFN is
                             kind 'time': softmax top-k experts + a sigmoid-gated shared expert
  multi-resolution heads     one linear head per horizon p in `heads`: position t predicts
                             x_{t+1} .. x_{t+p}; training averages the Huber loss over heads
  forecasting                autoregressive for any horizon (`forecast`)

Shapes: B series windows, T points, H hidden, P = sum(heads).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pikv.config import MoEConfig, ModelConfig
from pikv.models.moe_model import MoEModel
from pikv.models.transformer import Block, RMSNorm, check_transformer, model_rope


def _time_moe(moe_cfg: MoEConfig) -> MoEConfig:
    return dataclasses.replace(moe_cfg, kind="time")  # the layers are create_moe kind 'time'


def check_time_moe(cfg: ModelConfig, moe_cfg: MoEConfig) -> list[int]:
    """The rules of `TimeMoE(cfg, moe_cfg, ...)` without building it; ValueError naming the key.
    Returns the MoE layer indices."""
    return check_transformer(cfg, _time_moe(moe_cfg), kinds=("time",))


class TimeMoE(MoEModel):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, heads: list[int], deterministic: bool = False):
        super().__init__()
        H = cfg.hidden_size
        self.max_seq_len, self.heads = cfg.max_seq_len, list(heads)
        self.embed_gate = nn.Linear(1, H, bias=False)
        self.embed_value = nn.Linear(1, H, bias=False)
        self.rope = model_rope(cfg)
        time_moe = _time_moe(moe_cfg)
        moe_ids = check_time_moe(cfg, moe_cfg)
        self.layers = nn.ModuleList(Block(cfg, time_moe, i, i in moe_ids, deterministic) for i in range(cfg.num_layers))
        self.norm = RMSNorm(H, cfg.norm_eps)
        self.out_heads = nn.ModuleList(nn.Linear(H, p, bias=False) for p in self.heads)
        self.init_weights(cfg.init_std)

    def forward(self, values_BT: torch.Tensor) -> torch.Tensor:
        """values_BT float (normalised) -> predictions [B, T, P]: head j's p_j values follow."""
        if values_BT.dim() != 2 or values_BT.shape[1] > self.max_seq_len:
            raise ValueError(f"values shape {tuple(values_BT.shape)}: expected [batch, T] with "
                             f"T <= max_seq_len={self.max_seq_len}")
        if not torch.isfinite(values_BT).all():
            raise ValueError("the series contains NaN/inf values; fill or drop them before forecasting")
        x_BT1 = values_BT.unsqueeze(-1)
        h_BTH = torch.nn.functional.silu(self.embed_gate(x_BT1)) * self.embed_value(x_BT1)
        for block in self.layers:
            h_BTH = block(h_BTH, self.rope, 0)
        h_BTH = self.norm(h_BTH)
        return torch.cat([head(h_BTH) for head in self.out_heads], dim=-1)

    def split_heads(self, preds_BTP: torch.Tensor) -> list[torch.Tensor]:
        return list(preds_BTP.split(self.heads, dim=-1))

    @torch.no_grad()
    def forecast(self, context_BT: torch.Tensor, horizon: int) -> torch.Tensor:
        """Autoregressive forecast [B, horizon]: each round uses the longest head not beyond the
        remaining horizon (the shortest head, truncated, when all are longer) at the last
        position, appends its values and slides the window to max_seq_len points."""
        if horizon < 1:
            raise ValueError(f"horizon={horizon} must be >= 1")
        out, ctx = [], context_BT
        while sum(o.shape[1] for o in out) < horizon:
            remaining = horizon - sum(o.shape[1] for o in out)
            fitting = [j for j, p in enumerate(self.heads) if p <= remaining]
            j = max(fitting, key=lambda i: self.heads[i]) if fitting else min(
                range(len(self.heads)), key=lambda i: self.heads[i])
            step = self.split_heads(self(ctx[:, -self.max_seq_len:]))[j][:, -1, :remaining]
            out.append(step)
            ctx = torch.cat([ctx, step], dim=1)
        return torch.cat(out, dim=1)
