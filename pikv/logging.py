"""Rank-aware logging and metric sinks: console logger, metrics.jsonl, Weights & Biases.

Only rank 0 writes metrics; other ranks log warnings and errors only, so a run on 8 processes
prints one stream. wandb is optional: without it (or with mode 'disabled') metrics still go to
metrics.jsonl, which is the source of truth the tests read.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from pikv.config import LoggingConfig

WANDB_ID_FILE = "wandb_id.txt"


def get_logger(rank: int = 0) -> logging.Logger:
    logger = logging.getLogger("pikv")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of crashing
    return value


WANDB_IN_USE_WAIT_S = 120.0  # how long a resumed run waits for the killed job's W&B process to let go


def _init_retrying_in_use(init, wait_s: float = WANDB_IN_USE_WAIT_S, pause_s: float = 2.0):
    """wandb.init, retried while W&B answers "run ID ... is in use": a job requeued after a node
    loss can start before the killed job's wandb-core (an orphan on a surviving node) has released
    the run (seen in tests/integration/test_multinode.py under load). After `wait_s` the run goes on
    without W&B (metrics.jsonl keeps every step) rather than failing the training."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return init()
        except Exception as err:  # wandb raises its internal ServerResponseError
            if "is in use" not in str(err):
                raise
            if time.monotonic() >= deadline:
                get_logger().warning(f"W&B: {err} after {wait_s:.0f} s; logging to metrics.jsonl only")
                return None
            time.sleep(pause_s)


class MetricsLogger:
    """Writes one JSON object per logged step to metrics.jsonl and forwards it to wandb."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, resolved_config: dict,
                 enabled: bool, resume_step: Optional[int]):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._drop_steps_after(resume_step)
        self.file = open(self.path, "a")
        self.wandb_run = self._init_wandb(run_dir, cfg, run_name, resolved_config)
        # W&B keeps what a killed process logged after its last checkpoint and cannot delete it:
        # those steps run again but are not sent twice. What W&B holds is asked of W&B itself (the
        # server's step of a resumed online run, the files of offline runs): a process killed right
        # after a step may have written metrics.jsonl but never handed that step to W&B.
        self.wandb_logged_until = 0
        if self.wandb_run is not None and resume_step is not None:
            from pikv.wandb_offline import last_step  # needs wandb's protobufs: only when W&B is on
            self.wandb_logged_until = (last_step(run_dir, self.wandb_run.id) if self.wandb_run.offline
                                       else max(self.wandb_run.starting_step - 1, 0))

    def _drop_steps_after(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint: those steps run again."""
        if not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))
        os.replace(tmp, self.path)

    def _init_wandb(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict):
        mode = cfg.wandb_mode
        if mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            get_logger().warning("wandb is not installed (pip install 'pikv[wandb]'); logging to metrics.jsonl only")
            return None
        if mode == "online" and not _has_wandb_key():
            get_logger().warning("logging.wandb_mode=online but no W&B API key (WANDB_API_KEY or netrc): "
                                 "logging offline instead; sync later with `wandb sync`")
            mode = "offline"
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return _init_retrying_in_use(lambda: wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_name, tags=list(cfg.wandb_tags),
            config=config, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
            settings=wandb.Settings(quiet=True)))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None and step > self.wandb_logged_until:
            self.wandb_run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
