#!/usr/bin/env python3
"""Submit a PiKV training job to SLURM.

  python launch/slurm/submit.py --config configs/X.yaml --nodes 4 --gpus-per-node 8 \
      [--gpu-request gpus-per-node|gres|none] [--cpus-per-task C] [--tasks] [--time 24:00:00] \
      [--partition P] [--signal-seconds 300] [--dry-run] [key.sub=value ...]

--gpus-per-node N starts N processes per node and asks SLURM for N GPUs per node: `--gpus-per-node=N`
by default, `--gres=gpu:N` with --gpu-request gres (clusters without GPU TRES scheduling), nothing
with --gpu-request none (CPU nodes). The default comes from $PIKV_GPU_REQUEST when set, so a site
sets it once. See docs/launch.md.

The config is resolved (defaults <- YAML <- overrides) and checked by every builder now, and the
code (pikv/, train/, launch/, configs/) is copied into <run dir>/submit/<timestamp>/ together with
that resolved config, so edits made while the job waits in the queue (or between requeues) do not
change it. The job runs launch/slurm/train.sbatch from the snapshot with --requeue and
--signal=B:USR1@<seconds>.
Prints the sbatch command and the job id.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pikv.config import save_yaml  # noqa: E402
from pikv.tasks import load_job  # noqa: E402

GPU_REQUESTS = ("gpus-per-node", "gres", "none")
SNAPSHOT = ("pikv", "train", "launch", "configs", "pyproject.toml", "setup.cfg")


def unused(path: Path) -> Path:
    """path, else path-1, path-2, ...: two submissions within one second get a snapshot each."""
    candidate, i = path, 0
    while candidate.exists():
        i += 1
        candidate = path.with_name(f"{path.name}-{i}")
    return candidate


def snapshot(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SNAPSHOT:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def resource_args(gpu_request: str, gpus_per_node: int, cpus_per_task: int | None) -> list[str]:
    """The sbatch arguments that ask for what the job starts: GPUs per node, CPUs per task."""
    if gpu_request not in GPU_REQUESTS:
        raise ValueError(f"--gpu-request {gpu_request!r}: expected one of {', '.join(GPU_REQUESTS)}")
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {gpus_per_node}: need at least 1 (processes per node)")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task {cpus_per_task}: need at least 1")
    request = {"gpus-per-node": [f"--gpus-per-node={gpus_per_node}"], "gres": [f"--gres=gpu:{gpus_per_node}"],
               "none": []}[gpu_request]
    return request + ([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else [])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs requested and processes started per node")
    p.add_argument("--gpu-request", choices=GPU_REQUESTS, default=os.environ.get("PIKV_GPU_REQUEST") or "gpus-per-node",
                   help="how GPUs are requested: sbatch --gpus-per-node=N, --gres=gpu:N, or not at all "
                        "(default $PIKV_GPU_REQUEST, else gpus-per-node)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="sbatch --cpus-per-task (torchrun form: one task runs all processes of a node)")
    p.add_argument("--tasks", action="store_true", help="one SLURM task per process instead of srun torchrun")
    p.add_argument("--time", default=None, help="sbatch --time")
    p.add_argument("--partition", default=None)
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="SIGUSR1 this long before the time limit: checkpoint, stop, requeue")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch argument (repeatable)")
    p.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    p.add_argument("--dry-run", action="store_true", help="write the snapshot, print the command, do not submit")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        resources = resource_args(args.gpu_request, args.gpus_per_node, args.cpus_per_task)
        cfg = load_job(args.config, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Absolute output directory: the job's working directory is not where we are now.
    cfg = replace(cfg, train=replace(cfg.train, output_dir=str(Path(cfg.train.output_dir).resolve())))
    run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
    code = snapshot(unused(run_dir / "submit" / time.strftime("%Y%m%d-%H%M%S")))
    save_yaml(cfg, code / "config.yaml")
    per_node = 1 if not args.tasks else args.gpus_per_node
    env = ",".join(["ALL", f"PIKV_CODE={code}", f"PIKV_PYTHON={args.python}", f"GPUS_PER_NODE={args.gpus_per_node}",
                    f"PIKV_LAUNCH={'tasks' if args.tasks else 'torchrun'}", f"MAX_RESTARTS={args.max_restarts}"])
    cmd = ["sbatch", "--parsable", f"--job-name=pikv-{cfg.train.run_name}", f"--nodes={args.nodes}",
           f"--ntasks-per-node={per_node}", f"--signal=B:USR1@{args.signal_seconds}", "--requeue",
           "--open-mode=append", f"--output={run_dir}/slurm-%j.out", f"--chdir={run_dir}", f"--export={env}"]
    cmd += resources
    cmd += [f"--time={args.time}"] if args.time else []
    cmd += [f"--partition={args.partition}"] if args.partition else []
    cmd += args.sbatch_arg + [str(code / "launch/slurm/train.sbatch"), "--config", str(code / "config.yaml")]
    print(" ".join(cmd))
    if args.dry_run:
        return 0
    out = subprocess.run(cmd, text=True, capture_output=True)
    if out.returncode != 0:
        print(f"error: sbatch failed ({out.returncode}): {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; run directory {run_dir}; log {run_dir}/slurm-{job_id}.out")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
