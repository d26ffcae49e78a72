"""Checkpoints survive kills and reject bad files clearly; W&B offline runs read back."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pikv.config import load_config
from pikv.models import Transformer
from pikv.training.checkpoint import complete_checkpoints, load_model_weights, read_trainer_state
from tests.integration.conftest import REPO, TINY, read_metrics
from pikv.wandb_offline import history, run_ids

pytestmark = pytest.mark.slow


def test_wandb_offline_run_reads_back_and_resume_keeps_the_run_id(run_job):
    args = TINY + ["train.run_name=wb", "train.max_steps=8", "logging.wandb_mode=offline"]
    run_job(args + ["train.exit_at_step=4"], nproc=2)
    run_job(args, nproc=2)
    run_dir = run_job.cwd / "runs" / "wb"
    assert len(run_ids(run_dir)) == 1  # the resumed process continued the same W&B run
    rows = [r for r in history(run_dir) if "loss" in r]
    assert [r["_step"] for r in rows] == list(range(1, 9))  # unique and continuous across the restart
    jsonl = read_metrics(run_dir)
    for r in rows:
        # the same logged number through W&B's JSON encoding: at most a float32 round trip (6e-8)
        assert r["loss"] == pytest.approx(jsonl[r["_step"]]["loss"], rel=1e-7)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(run_job, pikv_cache):
    run_dir = run_job.cwd / "runs" / "killed"
    ckpt_root = run_dir / "checkpoints"
    args = TINY + ["train.run_name=killed", "train.max_steps=500", "train.checkpoint_every=1",
                   "train.keep_checkpoints=3", "logging.wandb_mode=disabled"]
    env = {**os.environ, "PIKV_CACHE": pikv_cache, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train/main.py")] + args, cwd=run_job.cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_mid_save = time.time() + 180, False
    try:
        while time.time() < deadline and proc.poll() is None:
            # Wait until at least one checkpoint is complete and the next one is being written.
            if len(complete_checkpoints(ckpt_root)) >= 2 and any(p.suffix == ".tmp" for p in ckpt_root.iterdir()):
                proc.send_signal(signal.SIGKILL)
                killed_mid_save = True
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert killed_mid_save, "the run never reached a checkpoint write"
    complete = complete_checkpoints(ckpt_root)
    assert complete, "no usable checkpoint left"
    newest = complete[-1]
    cfg = load_config(None, TINY)
    load_model_weights(newest, Transformer(cfg.model, cfg.moe))  # loads without error
    resumed = run_job(args[:-1] + ["train.max_steps=" + str(read_trainer_state(newest).step + 2),
                                   "logging.wandb_mode=disabled"])
    assert f"resumed from runs/killed/checkpoints/{newest.name} " in resumed.stdout + resumed.stderr


def test_corrupt_and_incompatible_checkpoints_fail_clearly(run_job):
    run_job(TINY + ["train.run_name=c", "train.max_steps=2", "logging.wandb_mode=disabled"])
    ckpt = run_job.cwd / "runs" / "c" / "checkpoints" / "step_2"

    wrong = run_job(TINY + ["train.run_name=c2", "train.max_steps=4", "model.hidden_size=128",
                            f"train.resume={ckpt}", "logging.wandb_mode=disabled"], check=False)
    assert wrong.returncode != 0
    assert "incompatible with the configured model: model.hidden_size: checkpoint 64 vs config 128" in wrong.stderr

    distcp = next(ckpt.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])  # truncated tensor data
    out = run_job(["--checkpoint", str(ckpt)], script="train/eval.py", check=False)
    assert out.returncode == 2 and f"checkpoint {ckpt}: cannot load model weights" in out.stderr

    (ckpt / "trainer.json").write_text("{not json")
    out = run_job(["--checkpoint", str(ckpt)], script="train/eval.py", check=False)
    assert out.returncode == 2 and f"checkpoint file {ckpt / 'trainer.json'} is corrupt" in out.stderr
