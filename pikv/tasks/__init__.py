"""Tasks: what the one training loop trains (`task: lm | flex | time` in the job config).

A task builds the model (before expert sharding: pikv.models.parallelize applies to any model
whose MoE layers are `MoELayer`s), owns the resumable training loader, turns the model output
into its loss terms and evaluates. Everything else (engines, gradient reduction, router losses,
checkpoints, metrics, W&B, signals) is the trainer's and identical for every task:

  task.build_model() -> nn.Module      with moe_layers(), router_losses(), num_params(),
                                       num_active_params()
  task.loader                          next_batch() -> (inputs, targets); state_dict /
                                       load_state_dict (inputs: a tensor or a tuple of tensors,
                                       passed to the model as positional arguments)
  task.loss_key                        the name of the task loss in loss_parts
  task.loss_parts(output, targets)     {loss_key: scalar with grad, ...logged extras}
  task.evaluate(model, split, max_batches, device, amp_dtype) -> dict of floats
  task.describe(result) -> str         one log line for an evaluation result
  Task.check(cfg)                      (static) the rules of everything the task builds, without
                                       building it; ValueError naming the config key
  task.tokens_per_micro_batch          tokens (LM tokens, modality tokens, time points) per rank
  task.flops_per_token(model)          training FLOPs per token, for MFU
  task.tokenizer_path                  copied into every checkpoint (None: no tokenizer)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pikv.config import JobConfig, merge_config, resolve, validate
from pikv.distributed import DistContext

TASKS = ("lm", "flex", "time")


def task_class(name: str) -> type:
    """The task class of `task: name` (imported on demand: each pulls in its own data code)."""
    if name == "flex":
        from pikv.tasks.flex import FlexTask
        return FlexTask
    if name == "time":
        from pikv.tasks.time import TimeTask
        return TimeTask
    from pikv.tasks.lm import LMTask
    return LMTask


def build_task(cfg: JobConfig, run_dir: Path, ctx: DistContext):
    """The task named by `cfg.task`; the main rank prepares its data, then every rank loads it."""
    return task_class(cfg.task)(cfg, run_dir, ctx)


def check_job(cfg: JobConfig) -> JobConfig:
    """Every check of a job before any work: the config's own (pikv.config.validate), then those of
    each builder the task will use (model, MoE layers and routers, KV compressor, data), all
    naming the config key. Reads `cfg` only; returns it."""
    validate(cfg)
    task_class(cfg.task).check(cfg)
    return cfg


def load_job(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> JobConfig:
    """What an entry point loads: defaults <- YAML <- overrides (with model.init_from_hf: defaults <-
    the pretrained model <- YAML <- overrides, pikv/tasks/pretrained.py), resolved, then `check_job`."""
    cfg = merge_config(path, overrides)
    if cfg.model.init_from_hf:
        from pikv.tasks.pretrained import pretrained_job
        cfg = pretrained_job(cfg, path, overrides)
    return check_job(resolve(cfg))
