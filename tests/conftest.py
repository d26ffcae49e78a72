import os

# Before torch is imported: one thread per process (forked gloo workers hang if the parent ran a
# multithreaded matmul first) and W&B never reaches the network.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402,F401  pre-import heavy modules once for every test and forked worker
import torch.distributed  # noqa: E402,F401
