import os

# Before torch is imported: one thread per process (forked gloo workers hang if the parent ran a
# multithreaded matmul first) and W&B never reaches the network.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  pre-import heavy modules once for every test and forked worker
import torch.distributed  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Backstop: every test starts from the same global RNG state whatever ran before it, so a
    test that draws without its own seed or generator still sees the same numbers on every run
    and in any order (-k, a single file, xdist). Tests that compare numbers seed explicitly too."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """wandb.init in this process (an in-process training test) puts its service's address in
    os.environ["WANDB_SERVICE"]; every later subprocess (torchrun, SLURM jobs) would then log through
    this pytest process's wandb-core, which keeps a killed job's run open, so its requeued job finds
    "run ID ... is in use" (tests/integration/test_multinode.py, node loss). Each test's
    subprocesses start their own service."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)
