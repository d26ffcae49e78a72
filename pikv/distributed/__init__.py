"""Process groups and the launch environment (torchrun, SLURM, plain python), the all-to-all
autograd op and the gradient reducer.

Process groups are created here only (pikv/testing.py makes the test worlds). Other parts run
plain torch.distributed collectives on the groups they are handed (pikv/models/parallelize.py hands
them out): the MoE layer's routing statistics and the EP dispatcher (pikv/moe), evaluation sums (pikv/eval/lm.py), and checkpoints,
metrics and the DeepSpeed engine (pikv/training).
"""

from pikv.distributed.env import (DistContext, destroy_distributed, init_distributed, launch_world_size,
                                  report_error)
from pikv.distributed.grad_sync import GradientReducer

__all__ = ["DistContext", "GradientReducer", "destroy_distributed", "init_distributed", "launch_world_size",
           "report_error"]
