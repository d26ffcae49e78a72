"""Flex-MoE on the three-modality diabetes data (pikv/data/multimodal.py): cross-entropy on the
training patients with their missing modalities; evaluation masks every validation / held-out
patient into each of the 2^M - 1 modality combinations and reports accuracy per combination."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pikv.config import JobConfig
from pikv.data.multimodal import MODALITIES, NUM_COMBOS, combo_mask, combo_name, load_multimodal
from pikv.data.samples import SampleLoader
from pikv.distributed import DistContext
from pikv.models.flex_moe import FlexMoE, check_flex_moe


class FlexTask:
    loss_key = "ce_loss"
    tokenizer_path = None

    def __init__(self, cfg: JobConfig, run_dir: Optional[Path], ctx: DistContext):
        f = cfg.flex
        self.cfg = cfg
        self.splits = load_multimodal(f.missing, f.missing_rate, f.validation_fraction, f.heldout_fraction,
                                      cfg.data.split_seed)
        counts = self.splits["train"].observed.sum(1)

        def order(rng: np.random.Generator) -> np.ndarray:
            # Flex-MoE sorts samples by their number of modalities, most first: full samples
            # train the experts through the G-Router before the S-Router specialises them.
            perm = rng.permutation(len(counts))
            return perm[np.argsort(-counts[perm], kind="stable")]

        self.loader = SampleLoader(len(counts), cfg.train.batch_size, self._gather, ctx.dp_rank, ctx.dp_size,
                                   cfg.train.seed, order)
        self.tokens_per_micro_batch = cfg.train.batch_size * len(MODALITIES)

    def _gather(self, ids: np.ndarray):
        s = self.splits["train"]
        return (torch.from_numpy(s.features[ids]), torch.from_numpy(s.observed[ids])), torch.from_numpy(s.labels[ids])

    @staticmethod
    def check(cfg: JobConfig) -> None:
        check_flex_moe(cfg.model, cfg.moe, cfg.flex)

    def build_model(self) -> nn.Module:
        return FlexMoE(self.cfg.model, self.cfg.moe, self.cfg.flex)

    def loss_parts(self, logits_BK: torch.Tensor, labels_B: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(logits_BK.float(), labels_B)
        return {"ce_loss": ce, "accuracy": (logits_BK.argmax(-1) == labels_B).float().mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, max_batches: Optional[int], device: torch.device,
                 amp_dtype: Optional[torch.dtype]) -> dict:
        """Every rank scores the whole (small) split in every combination, so the forwards (and
        the all-to-alls under expert parallelism) match across ranks; max_batches is unused."""
        s = self.splits[split]
        features = torch.from_numpy(s.features).to(device)
        labels = torch.from_numpy(s.labels).to(device)
        was_training = model.training
        model.eval()
        out, ces = {}, []
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        for c in range(NUM_COMBOS):
            observed = torch.from_numpy(np.tile(combo_mask(c), (len(labels), 1))).to(device)
            with amp:
                logits = model(features, observed).float()
            ces.append(F.cross_entropy(logits, labels).item())
            out[f"accuracy/{combo_name(c)}"] = (logits.argmax(-1) == labels).float().mean().item()
        model.train(was_training)
        accs = [out[f"accuracy/{combo_name(c)}"] for c in range(NUM_COMBOS)]
        return {"ce": float(np.mean(ces)), "accuracy": float(np.mean(accs)),
                "accuracy_full": out[f"accuracy/{combo_name(NUM_COMBOS - 1)}"], **out}

    @staticmethod
    def describe(result: dict) -> str:
        return (f"accuracy {result['accuracy']:.3f} (mean over the {NUM_COMBOS} modality combinations, "
                f"all modalities {result['accuracy_full']:.3f}), ce {result['ce']:.4f}")

    def flops_per_token(self, model: nn.Module) -> float:
        return model.flops_per_token(len(MODALITIES))
