"""Training: the loop, optimizer and schedule, checkpoints, throughput accounting."""

from pikv.training.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]
