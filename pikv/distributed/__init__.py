"""Process groups and collectives. The only package that talks to torch.distributed directly."""

from pikv.distributed.env import DistContext, destroy_distributed, init_distributed
from pikv.distributed.grad_sync import GradientReducer

__all__ = ["DistContext", "GradientReducer", "destroy_distributed", "init_distributed"]
