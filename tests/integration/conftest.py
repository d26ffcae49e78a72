"""End-to-end fixtures: run the real entry points as a user would (torchrun / python)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A small model on the real embedded corpus: every code path of the default job, in seconds.
TINY = [
    "model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.expert_ffn_hidden_size=64",
    "model.num_experts=4", "model.top_k=2", "model.max_seq_len=64", "data.seq_len=64",
    "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every=1000",
    "train.eval_batches=2", "logging.log_every=1", "logging.progress=false",
    "model.rotary_fraction=1.0",  # head dim 16: the decoupled latent's rotated dims alone exceed a 4x budget
]


# Loss curves of one global batch split another way (1 process, EP=2, DP=2 x EP=2, or resharded
# on resume) add in another fp32 order: measured up to 1.4e-6 on losses ~6.3 over 6 steps
# (test_expert_parallel_training, 1.2e-7 for the variants). 2e-5 leaves >10x headroom and is far
# below what one optimizer step changes (1e-2 to 1e-1).
SAME_CURVE_ABS = 2e-5
# Resuming in the same layout replays the same kernels in the same order: measured bit-identical
# (test_train_e2e, 12 steps). The 1e-6 slack is for backends whose reductions are not bitwise
# deterministic; a lost optimizer or data-loader state shows as a 1e-2 step-sized change.
RESUMED = dict(rel=1e-6, abs=1e-6)


@pytest.fixture(scope="session")
def pikv_cache(tmp_path_factory) -> str:
    return os.environ.get("PIKV_CACHE") or str(tmp_path_factory.mktemp("pikv-cache"))


@pytest.fixture
def run_job(tmp_path: Path, pikv_cache: str):
    """run_job(args, nproc=None) -> CompletedProcess; nproc=None runs plain `python train/main.py`."""

    def run(args: list[str], nproc: int | None = None, script: str = "train/main.py",
            check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "PIKV_CACHE": pikv_cache, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
               "WANDB_SILENT": "true"}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc else [sys.executable]
        proc = subprocess.run(launcher + [str(REPO / script)] + args, cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        return proc

    run.cwd = tmp_path
    return run


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """Training rows of metrics.jsonl by step (validation rows are merged into their step)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def read_losses(run_dir: Path) -> dict[int, float]:
    """The training loss of every logged step."""
    rows = read_metrics(run_dir)
    return {step: row["loss"] for step, row in rows.items() if "loss" in row}


# ---- SLURM test clusters (test_slurm.py: one node; test_multinode.py: two netns nodes) ----------
_LAUNCH_VARS = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC")


def slurm_env(cluster_dir: Path, pikv_cache: str, **extra: str) -> dict[str, str]:
    """The environment of jobs submitted to the test cluster in `cluster_dir`: its slurm.conf,
    the shared data cache, offline W&B, and none of the launch variables of an outer job."""
    env = {**os.environ, "SLURM_CONF": str(cluster_dir / "slurm.conf"), "PIKV_CACHE": pikv_cache,
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}
    for key in [k for k in env if k.startswith(_LAUNCH_VARS) and k != "SLURM_CONF"]:
        env.pop(key)
    return env


def submit_job(env: dict[str, str], cwd: Path, args: list[str]) -> str:
    """launch/slurm/submit.py with `args`; the job id."""
    out = subprocess.run([sys.executable, str(REPO / "launch/slurm/submit.py")] + args, cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1].split()[2].rstrip(";")  # "submitted job <id>; ..."
