"""Train one config in this process through the real Trainer (the same loop, engine and checkpoints
as `train/main.py`) and evaluate splits: what bench/flex_moe.py and bench/time_moe.py compare."""

from __future__ import annotations

import tempfile
import time
from typing import Optional

from pikv.config import load_config
from pikv.distributed import init_distributed
from pikv.training import Trainer

_CTX = None  # one process group of one for every run of a bench


def train_and_evaluate(config: Optional[str], overrides: list[str],
                       splits: tuple[str, ...] = ("heldout",)) -> dict:
    """Returns {split: task.evaluate(split) dict, 'active_params', 'params', 'seconds' (of fit)}.
    The run folder is temporary: nothing but the returned numbers is kept."""
    global _CTX
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [f"train.output_dir={out}", "train.resume=never", "logging.wandb_mode=disabled",
                                   "logging.progress=false", "logging.log_every=50", *overrides])
        if _CTX is None:
            _CTX = init_distributed(cfg.train.device, cfg.parallel.backend, 1)
        trainer = Trainer(cfg, _CTX)
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        results = {s: trainer.task.evaluate(trainer.model, s, None, _CTX.device, trainer.amp_dtype) for s in splits}
    return {**results, "params": trainer.param_counts["num_params"],
            "active_params": trainer.param_counts["num_active_params"], "seconds": seconds}
