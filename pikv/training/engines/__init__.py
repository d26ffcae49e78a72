"""Training engines: what runs backward, gradient reduction, clipping and the optimizer step.

The trainer owns one loop (data, forward, loss, logging, checkpoints) and hands the numerics of
a step to an engine with a small interface:

  engine.forward         the callable that runs the model (the module, or DeepSpeed's wrapper)
  engine.set_lr(lr)      the learning rate of the coming step (the schedule is PiKV's)
  engine.backward(loss, last)   one micro-batch; `loss` is already divided by grad_accum_steps
  engine.step() -> norm  reduce gradients, clip by the global norm, update, clear gradients
  engine.skip_step()     drop this step's gradients without an update (NaN/inf loss)
  engine.dcp_optimizer   the optimizer whose state goes into the (reshardable) DCP checkpoint,
                         or None when the engine saves it itself (save_extra / load_extra)

`torch`: PiKV's GradientReducer + AdamW. `deepspeed`: deepspeed.initialize with ZeRO 0/1/2.
"""

from __future__ import annotations

from torch import nn

from pikv.config import JobConfig
from pikv.distributed import DistContext


def build_engine(model: nn.Module, cfg: JobConfig, ctx: DistContext):
    """The engine named by `train.engine` around an already parallelised model on its device."""
    if cfg.train.engine == "deepspeed":
        from pikv.training.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, ctx)
    from pikv.training.engines.torch_engine import TorchEngine

    return TorchEngine(model, cfg, ctx)
