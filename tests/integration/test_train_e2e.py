"""The main job end to end: torchrun training, exact resume, evaluation, config errors."""

import json
import math

import pytest

from tests.integration.conftest import RESUMED, TINY, read_metrics

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_trains_and_evaluates(run_job):
    run_job(TINY + ["train.run_name=two", "train.max_steps=40", "train.eval_every=20",
                    "train.checkpoint_every=20"], nproc=2)
    run_dir = run_job.cwd / "runs" / "two"
    rows = read_metrics(run_dir)
    assert sorted(rows) == list(range(1, 41))
    losses = [rows[s]["loss"] for s in range(1, 41)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert rows[40]["val/bits_per_byte"] < rows[20]["val/bits_per_byte"]
    for key in ("lr", "tokens_per_s", "mfu", "aux_loss", "z_loss", "moe/layer0/tokens_per_expert"):
        assert key in rows[1], key
    # 2 ranks x 4 sequences x 64 tokens x top-2, summed over both ranks (global statistics)
    assert sum(rows[1]["moe/layer0/tokens_per_expert"]) == 2 * 4 * 64 * 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data_split.json").is_file()
    assert (run_dir / "expert_load.png").stat().st_size > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_20", "step_40"]

    proc = run_job(["--checkpoint", str(run_dir)], script="train/eval.py")
    report = json.loads((run_dir / "eval" / "heldout_eval.json").read_text())
    assert report["checkpoint"].endswith("step_40")
    assert 0 < report["bits_per_byte"] < 8 and report["tokens"] > 1000
    split = json.loads((run_dir / "data_split.json").read_text())
    assert report["documents"] == sorted(split["splits"]["heldout"]["docs"])
    assert "bits/byte" in proc.stdout


def test_exact_resume_equals_uninterrupted_run(run_job):
    common = TINY + ["train.max_steps=12", "train.checkpoint_every=100"]
    run_job(common + ["train.run_name=straight"], nproc=2)
    run_job(common + ["train.run_name=resumed", "train.exit_at_step=5"], nproc=2)
    first = read_metrics(run_job.cwd / "runs" / "resumed")
    assert sorted(first) == [1, 2, 3, 4, 5]
    proc = run_job(common + ["train.run_name=resumed"], nproc=2)
    assert "resumed from" in proc.stdout + proc.stderr
    straight = read_metrics(run_job.cwd / "runs" / "straight")
    resumed = read_metrics(run_job.cwd / "runs" / "resumed")
    assert sorted(resumed) == list(range(1, 13))  # every step exactly once
    for step in range(1, 13):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], **RESUMED), step
        assert resumed[step]["moe/layer1/tokens_per_expert"] == straight[step]["moe/layer1/tokens_per_expert"]


def test_plain_python_single_process(run_job):
    run_job(TINY + ["train.run_name=solo", "train.max_steps=3", "logging.wandb_mode=disabled"])
    rows = read_metrics(run_job.cwd / "runs" / "solo")
    assert sorted(rows) == [1, 2, 3]
    assert not (run_job.cwd / "runs" / "solo" / "wandb").exists()


def test_bad_config_fails_before_any_work(run_job):
    proc = run_job(["model.top_k=9", "train.run_name=bad"], check=False)
    assert proc.returncode == 2
    assert "config key 'model.top_k' = 9 is invalid: must be <= model.num_experts=8" in proc.stderr
    assert not (run_job.cwd / "runs").exists()
