"""Time-MoE forecasting on statsmodels' series (pikv/data/timeseries.py): multi-resolution Huber
loss on context-normalised training windows; evaluation forecasts autoregressively and reports
MSE / MAE per horizon next to the seasonal-naive forecast of the same windows."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pikv.config import JobConfig
from pikv.data.samples import SampleLoader
from pikv.data.timeseries import load_series, make_windows, seasonal_naive
from pikv.distributed import DistContext
from pikv.models.time_moe import TimeMoE, check_time_moe

EVAL_BATCH = 256


class TimeTask:
    loss_key = "huber_loss"
    tokenizer_path = None

    def __init__(self, cfg: JobConfig, run_dir: Optional[Path], ctx: DistContext):
        self.cfg, tc = cfg, cfg.time
        self.C, self.heads = tc.context_len, list(tc.heads)
        train_series, heldout_series = load_series()
        self.train = make_windows(train_series, self.C, max(self.heads), 0.0, tc.train_fraction)
        self.eval_sets = {
            "validation": {h: make_windows(train_series, self.C, h, tc.train_fraction, 1.0) for h in tc.eval_horizons},
            "heldout": {h: make_windows(heldout_series, self.C, h, 0.0, 1.0) for h in tc.eval_horizons},
        }
        self.loader = SampleLoader(len(self.train.windows), cfg.train.batch_size, self._gather, ctx.dp_rank,
                                   ctx.dp_size, cfg.train.seed)
        self.tokens_per_micro_batch = cfg.train.batch_size * self.C

    def _gather(self, ids: np.ndarray):
        w = torch.from_numpy(self.train.windows[ids])
        return w[:, :self.C], w  # inputs: the context; targets: the whole window

    @staticmethod
    def check(cfg: JobConfig) -> None:
        check_time_moe(cfg.model, cfg.moe)

    def build_model(self) -> nn.Module:
        return TimeMoE(self.cfg.model, self.cfg.moe, self.heads)

    def loss_parts(self, preds_BTP: torch.Tensor, window_BL: torch.Tensor) -> dict[str, torch.Tensor]:
        """Time-MoE eq. 8: position t's head p predicts x_{t+1..t+p}; Huber per head, averaged."""
        T = preds_BTP.shape[1]
        losses = []
        for p, pred_BTp in zip(self.heads, preds_BTP.float().split(self.heads, dim=-1)):
            target_BTp = window_BL[:, 1:].unfold(1, p, 1)[:, :T]
            losses.append(F.huber_loss(pred_BTp, target_BTp, delta=self.cfg.time.huber_delta))
        return {"huber_loss": torch.stack(losses).mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, max_batches: Optional[int], device: torch.device,
                 amp_dtype: Optional[torch.dtype]) -> dict:
        """MSE / MAE (context-normalised scale) per eval horizon for the model and seasonal naive.
        Every rank forecasts every window (equal collectives under EP); max_batches caps the
        windows at max_batches * 256 per horizon."""
        was_training = model.training
        model.eval()
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        out = {}
        for h, ws in self.eval_sets[split].items():
            n = len(ws.windows) if max_batches is None else min(len(ws.windows), max_batches * EVAL_BATCH)
            ctx, target = ws.windows[:n, :self.C], ws.windows[:n, self.C:]
            preds = []
            for lo in range(0, n, EVAL_BATCH):
                with amp:
                    preds.append(model.forecast(torch.from_numpy(ctx[lo:lo + EVAL_BATCH]).to(device), h).float().cpu())
            pred = torch.cat(preds).numpy()
            naive = seasonal_naive(ctx, ws.seasons[:n], h)
            for name, p in (("", pred), ("snaive_", naive)):
                out[f"{name}mse_h{h}"] = float(np.mean((p - target) ** 2))
                out[f"{name}mae_h{h}"] = float(np.mean(np.abs(p - target)))
        model.train(was_training)
        return out

    def describe(self, result: dict) -> str:
        return ", ".join(f"h={h}: MSE {result[f'mse_h{h}']:.3f} MAE {result[f'mae_h{h}']:.3f} "
                         f"(seasonal naive {result[f'snaive_mse_h{h}']:.3f} / {result[f'snaive_mae_h{h}']:.3f})"
                         for h in self.cfg.time.eval_horizons)

    def flops_per_token(self, model: nn.Module) -> float:
        return model.flops_per_token(self.C)
