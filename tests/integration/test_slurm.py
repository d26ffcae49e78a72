"""The SLURM launch path against a real one-node SLURM cluster on localhost.

The cluster (slurmctld + slurmd + munged on non-default ports, under a temp dir) is started once
for this module by tests/integration/slurm_cluster.sh, which also installs Debian's packages when
they are missing. The tests skip, saying why, when not root or when the packages cannot be
installed; .ci/run installs them first, so CI runs them.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, TINY, read_metrics, slurm_env, submit_job
from pikv.wandb_offline import history, run_ids

pytestmark = pytest.mark.slow
CLUSTER = REPO / "tests" / "integration" / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm(pikv_cache):
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start slurmctld/slurmd/munged as root; not running as root")
    install = subprocess.run([str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"SLURM packages (slurmctld slurmd slurm-client munge) could not be installed: "
                    f"{(install.stderr or install.stdout).strip()[-500:]}")
    # Not under pytest's tmp dir: munged needs execute permission for all on every parent directory.
    d = Path(tempfile.mkdtemp(prefix="pikv-slurm-"))
    d.chmod(0o711)
    start = subprocess.run([str(CLUSTER), "start", str(d)], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, f"one-node SLURM cluster did not start:\n{start.stdout}\n{start.stderr}"
    env = slurm_env(d, pikv_cache, PIKV_GPU_REQUEST="none")  # CPU nodes: no GPUs to ask
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        subprocess.run([str(CLUSTER), "stop", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


def _job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "GONE"


def _wait_done(env, job: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_state(env, job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {_job_state(env, job)} after {timeout} s")


def _training_rows(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_sbatch_two_processes_completes_with_checkpoints_and_metrics(slurm, tmp_path):
    job = submit_job(slurm, tmp_path, ["--gpus-per-node", "2"] + TINY +
                  ["train.run_name=sb", "train.max_steps=6", "train.checkpoint_every=3",
                   "parallel.expert_parallel_size=2", "logging.wandb_mode=disabled"])
    state = _wait_done(slurm, job)
    run_dir = tmp_path / "runs" / "sb"
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert sorted(read_metrics(run_dir)) == list(range(1, 7))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3", "step_6"]
    snap = next((run_dir / "submit").iterdir())
    assert (snap / "config.yaml").is_file() and (snap / "pikv" / "training" / "trainer.py").is_file()
    assert f"code {snap}" in log  # the job ran the snapshot, not the working tree


def test_usr1_requeues_and_the_requeued_job_resumes_every_step_once(slurm, tmp_path):
    steps = 40
    job = submit_job(slurm, tmp_path, ["--gpus-per-node", "2"] + TINY +
                  ["train.run_name=rq", f"train.max_steps={steps}", "train.checkpoint_every=1000",
                   "logging.wandb_mode=offline"])
    run_dir = tmp_path / "runs" / "rq"
    deadline = time.time() + 180
    while time.time() < deadline:  # signal mid-run: after a few steps, well before the end
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(_training_rows(run_dir)) >= 3:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"job {job} never logged 3 steps ({_job_state(slurm, job)})")
    # What --signal=B:USR1@N does at the time limit: SIGUSR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    state = _wait_done(slurm, job, timeout=400)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "requeueing job" in log and "restart 1" in log, log[-4000:]
    stopped_at = json.loads(log.split("stopped after a checkpoint (")[1].split(")")[0])["step"]
    assert 3 <= stopped_at < steps
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at} at step {stopped_at}" in log
    rows = _training_rows(run_dir)
    assert rows == list(range(1, steps + 1))  # every step exactly once, in order
    assert len(run_ids(run_dir)) == 1  # the requeued job continued the same W&B run
    wandb_steps = [r["_step"] for r in history(run_dir) if "loss" in r]
    assert wandb_steps == list(range(1, steps + 1))


def test_srun_one_task_per_process(slurm, tmp_path):
    proc = subprocess.run(["srun", "-n2", "--time=10", sys.executable, str(REPO / "train/main.py")] + TINY +
                          ["train.run_name=tasks", "train.max_steps=4", "parallel.expert_parallel_size=2",
                           "logging.wandb_mode=disabled"],
                          cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tasks"
    assert sorted(read_metrics(run_dir)) == [1, 2, 3, 4]
    summary = json.loads((run_dir / "model_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ep_size"] == 2
