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
