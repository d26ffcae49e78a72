"""torchrun --max-restarts: SIGKILL one worker mid-run; the job restarts, resumes from the newest
complete checkpoint and ends with exactly the model of an uninterrupted run. Metrics and the
offline W&B run hold every step once."""

import os
import signal
import subprocess
import time

import pytest
import torch

from pikv.config import load_config
from pikv.models import Transformer
from pikv.training.checkpoint import load_model_weights
from tests.integration.conftest import REPO, RESUMED, TINY, read_metrics
from pikv.wandb_offline import history, run_ids

pytestmark = pytest.mark.slow
STEPS = 24
ARGS = TINY + [f"train.max_steps={STEPS}", "train.checkpoint_every=4", "logging.wandb_mode=offline"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _final_weights(run_dir):
    cfg = load_config(None, ARGS)
    model = Transformer(cfg.model, cfg.moe)
    load_model_weights(run_dir / "checkpoints" / f"step_{STEPS}", model)
    return model.state_dict()


def test_sigkill_of_one_worker_restarts_and_ends_with_the_uninterrupted_model(run_job, pikv_cache):
    run_job(ARGS + ["train.run_name=straight"], nproc=2)
    env = {**os.environ, "PIKV_CACHE": pikv_cache, "OMP_NUM_THREADS": "1", "NPROC": "2", "MAX_RESTARTS": "1",
           "WANDB_MODE": "offline", "PYTHON": os.environ.get("PYTHON", str(REPO / ".venv/bin/python"))}
    env["PYTHON"] = env["PYTHON"] if os.path.exists(env["PYTHON"]) else "python3"
    launcher = subprocess.Popen(["bash", str(REPO / "launch/local.sh")] + ARGS + ["train.run_name=killed"],
                                cwd=run_job.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = run_job.cwd / "runs" / "killed"
    metrics = run_dir / "metrics.jsonl"
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and launcher.poll() is None:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if done >= 6 and (run_dir / "checkpoints" / "step_4").is_dir():
            workers = _children(launcher.pid)
            if len(workers) == 2:
                killed = workers[1]
                os.kill(killed, signal.SIGKILL)  # rank 1 dies between checkpoints
                break
        time.sleep(0.05)
    out, _ = launcher.communicate(timeout=300)
    assert killed is not None, "the run never got far enough to be killed:\n" + out[-3000:]
    assert launcher.returncode == 0, out[-4000:]
    assert "resumed from runs/killed/checkpoints/step_" in out

    assert sorted(read_metrics(run_dir)) == list(range(1, STEPS + 1))
    straight, resumed = _final_weights(run_job.cwd / "runs" / "straight"), _final_weights(run_dir)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=RESUMED["abs"], rtol=RESUMED["rel"],
                                   msg=lambda m: f"{name}: {m}")

    assert len(run_ids(run_dir)) == 1  # the restarted workers continued the same W&B run
    steps = [row["_step"] for row in history(run_dir) if "loss" in row]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice, none missing
