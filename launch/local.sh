#!/usr/bin/env bash
# One node, N processes:  NPROC=8 launch/local.sh --config configs/tiny.yaml train.max_steps=100
# MAX_RESTARTS=3 makes torchrun restart all workers after a failure; the restart resumes from the
# newest complete checkpoint (train.resume=auto).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" \
    --max-restarts "${MAX_RESTARTS:-0}" "$REPO/train/main.py" "$@"
