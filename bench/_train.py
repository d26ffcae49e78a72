"""Shared by bench/flex_moe.py and bench/time_moe.py: train one config in this process through
the real Trainer (same loop, engine, checkpoints as `train/main.py`) and evaluate a split."""

import tempfile
import time

from pikv.config import load_config
from pikv.distributed import init_distributed
from pikv.training import Trainer

_CTX = None


def train_and_evaluate(config: str, overrides: list[str], splits: tuple[str, ...] = ("heldout",)) -> dict:
    """Returns {split: task.evaluate(split) dict, 'active_params', 'params', 'seconds'}."""
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
