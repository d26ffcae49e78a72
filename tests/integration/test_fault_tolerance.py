"""Non-finite losses are skipped up to a limit, then stop clearly; a signal stops after a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import REPO, TINY, read_metrics

pytestmark = pytest.mark.slow
COMMON = TINY + ["train.checkpoint_every=2", "logging.wandb_mode=disabled"]


def test_nan_steps_are_skipped_then_the_run_stops_naming_step_and_checkpoint(run_job, monkeypatch):
    monkeypatch.setenv("PIKV_TEST_NAN_STEPS", "3")
    run_job(COMMON + ["train.run_name=one_nan", "train.max_steps=5", "train.max_nonfinite_steps=1"])
    rows = read_metrics(run_job.cwd / "runs" / "one_nan")
    assert sorted(rows) == [1, 2, 3, 4, 5] and rows[3].get("skipped_nonfinite") == 1.0
    assert all("skipped_nonfinite" not in rows[s] for s in (1, 2, 4, 5))

    monkeypatch.setenv("PIKV_TEST_NAN_STEPS", "3,4")
    proc = run_job(COMMON + ["train.run_name=two_nan", "train.max_steps=6", "train.max_nonfinite_steps=1"],
                   check=False)
    assert proc.returncode == 1
    assert ("error: step 4: the loss was NaN/inf for the 2th time, more than train.max_nonfinite_steps=1; "
            "stopping. Last good checkpoint: runs/two_nan/checkpoints/step_2") in proc.stderr


def test_sigterm_checkpoints_and_a_rerun_continues_without_losing_a_step(run_job, pikv_cache):
    args = COMMON + ["train.run_name=sig", "train.max_steps=400", "train.checkpoint_every=1000"]
    env = {**os.environ, "PIKV_CACHE": pikv_cache, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train/main.py")] + args, cwd=run_job.cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_job.cwd / "runs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    marker = json.loads((run_job.cwd / "runs" / "sig" / "preempted.json").read_text())
    stopped = marker["step"]
    assert marker["signal"] == "SIGTERM" and 3 <= stopped < 400
    assert sorted(read_metrics(run_job.cwd / "runs" / "sig")) == list(range(1, stopped + 1))
    resumed = run_job(COMMON + ["train.run_name=sig", f"train.max_steps={stopped + 2}"])
    assert f"resumed from runs/sig/checkpoints/step_{stopped} at step {stopped}" in resumed.stdout + resumed.stderr
    assert sorted(read_metrics(run_job.cwd / "runs" / "sig")) == list(range(1, stopped + 3))
    assert not (run_job.cwd / "runs" / "sig" / "preempted.json").exists()
