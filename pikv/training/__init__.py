"""Training: the loop and its step hooks, optimizer and schedule, checkpoints, throughput accounting."""

from pikv.training.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]
