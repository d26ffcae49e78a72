"""Language modelling on the prepared token corpus: next-token cross-entropy, bits per byte."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pikv.config import JobConfig, config_keys
from pikv.data import BlockLoader, iter_eval_batches, prepare_data
from pikv.data.plan import check_split
from pikv.data.probe import check_probe_rate, make_probe
from pikv.distributed import DistContext
from pikv.eval import evaluate_lm
from pikv.kv.budgets import check_latent_budgets
from pikv.kv.learned import latent_rotary_dims
from pikv.models import Transformer
from pikv.models.freeze import check_freeze
from pikv.models.transformer import check_transformer


class LMTask:
    loss_key = "lm_loss"

    def __init__(self, cfg: JobConfig, run_dir: Path, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.data = prepare_data(cfg, run_dir, ctx.is_main, ctx.barrier)
        # the retrieval probe (pikv/data/probe.py) is mixed into training only, never validation
        probe = make_probe(self.data.tokenizer, cfg.data.probe_rate, cfg.train.seed, cfg.data.seq_len)
        self.loader = BlockLoader(self.data.tokens["train"], cfg.data.seq_len, cfg.train.batch_size,
                                  ctx.dp_rank, ctx.dp_size, cfg.train.seed, probe=probe)
        self.tokenizer_path = self.data.tokenizer_path
        self.tokens_per_micro_batch = cfg.train.batch_size * cfg.data.seq_len

    @staticmethod
    def check(cfg: JobConfig) -> None:
        check_transformer(cfg.model, cfg.moe)
        kv, m = cfg.kv, cfg.model
        if kv.compressor == "learned":
            with config_keys({"ratios": "kv.train_ratios", "bits": "kv.latent_bits", "window": "kv.latent_window"}):
                check_latent_budgets(m.num_kv_heads, m.hidden_size // m.num_heads, kv.train_ratios, kv.latent_bits,
                                     kv.latent_window, cfg.data.seq_len, latent_rotary_dims(m))
        with config_keys({"rate": "data.probe_rate"}):
            check_probe_rate(cfg.data.probe_rate)
        if cfg.train.freeze:  # the parameter names of this config's model, without allocating it
            with torch.device("meta"):
                names = [n for n, _ in Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv).named_parameters()]
            check_freeze(names, cfg.train.freeze)
        d = cfg.data
        with config_keys({k: f"data.{k}" for k in ("validation_docs", "heldout_docs", "validation_fraction",
                                                    "heldout_fraction")}):
            check_split(d.validation_docs, d.heldout_docs, d.validation_fraction, d.heldout_fraction)

    def calibration_windows(self, count: int) -> torch.Tensor:
        """[<= count, seq_len] the first windows of the train split (the same on every rank; the
        training loader's position is not touched): what the KV compressor's PCA init fits."""
        inputs_BT, _ = next(iter_eval_batches(self.data.tokens["train"], self.cfg.data.seq_len, count, max_batches=1))
        return inputs_BT

    def build_model(self) -> nn.Module:
        return Transformer(self.cfg.model, self.cfg.moe, kv_cfg=self.cfg.kv)

    def loss_parts(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"lm_loss": F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())}

    def evaluate(self, model: nn.Module, split: str, max_batches: Optional[int], device: torch.device,
                 amp_dtype: Optional[torch.dtype]) -> dict:
        batches = iter_eval_batches(self.data.tokens[split], self.cfg.data.seq_len, self.cfg.train.batch_size,
                                    self.ctx.dp_rank, self.ctx.dp_size, max_batches=max_batches)
        return evaluate_lm(model, batches, self.data.byte_lengths, device, amp_dtype).to_dict()

    @staticmethod
    def describe(result: dict) -> str:
        return f"val loss {result['nll']:.4f}, bits/byte {result['bits_per_byte']:.4f}"

    def flops_per_token(self, model: nn.Module) -> float:
        return model.flops_per_token(self.cfg.data.seq_len)
