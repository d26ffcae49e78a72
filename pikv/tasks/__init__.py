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
  task.tokens_per_micro_batch          tokens (LM tokens, modality tokens, time points) per rank
  task.flops_per_token(model)          training FLOPs per token, for MFU
  task.tokenizer_path                  copied into every checkpoint (None: no tokenizer)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from pikv.config import JobConfig
from pikv.distributed import DistContext

TASKS = ("lm", "flex", "time")


def build_task(cfg: JobConfig, run_dir: Path, ctx: DistContext):
    """The task named by `cfg.task`; the main rank prepares its data, then every rank loads it."""
    if cfg.task == "flex":
        from pikv.tasks.flex import FlexTask
        return FlexTask(cfg, ctx)
    if cfg.task == "time":
        from pikv.tasks.time import TimeTask
        return TimeTask(cfg, ctx)
    from pikv.tasks.lm import LMTask
    return LMTask(cfg, run_dir, ctx)


def evaluate_task_checkpoint(ckpt: Path, cfg: JobConfig, out: Optional[Path] = None) -> dict:
    """train/eval.py for task=flex|time: one CPU process rebuilds the model, loads the
    checkpoint's weights and scores the held-out split; writes <run>/eval/heldout_eval.json."""
    from pikv.training.checkpoint import load_model_weights

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), ep_size=1)
    task = build_task(cfg, ckpt.parent.parent, ctx)
    model = task.build_model()
    load_model_weights(ckpt, model)
    result = task.evaluate(model, "heldout", None, ctx.device, None)
    out = out or ckpt.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout_eval.json").write_text(json.dumps({"checkpoint": str(ckpt), "task": cfg.task, **result}, indent=1))
    print(f"held-out ({cfg.task}): {task.describe(result)}\nresults: {out / 'heldout_eval.json'}")
    return result
