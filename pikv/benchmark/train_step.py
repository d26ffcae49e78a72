"""A Trainer of the default job in this process, for benches that time or measure `train_step`
directly (bench/activation_checkpointing.py, bench/compile_step.py)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import Optional

from pikv.config import load_config
from pikv.distributed import DistContext, init_distributed
from pikv.training import Trainer

_CTX: Optional[DistContext] = None  # one process group of one for every trainer of a bench


def step_trainer(overrides: list[str], config: Optional[str] = "configs/tiny.yaml") -> Trainer:
    """Trainer of `config` + `overrides` (temporary run folder, no W&B, no resume) in training
    mode (the trainer applies train.activation_checkpointing and train.compile to its model)."""
    global _CTX
    out = tempfile.mkdtemp(prefix="pikv-bench-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    cfg = load_config(config, [f"train.output_dir={out}", "train.resume=never", "logging.wandb_mode=disabled",
                               "logging.progress=false", *overrides])
    if _CTX is None:
        _CTX = init_distributed(cfg.train.device, cfg.parallel.backend, 1)
    trainer = Trainer(cfg, _CTX)
    trainer.model.train()
    return trainer
