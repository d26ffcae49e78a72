"""Step hooks: what the trainer runs around a training step beside the model, the engine,
checkpoints and logging (the shape of OLMo-core's train callbacks, kept small).

The trainer calls every hook, in list order:
  before_step(step)            step = optimizer steps completed (the coming one is step + 1)
  per micro-batch, after the forward and the task loss:
    loss_terms(mb) -> LossTerms   weighted extra loss terms and metrics of the micro-batch
    (backward)
    after_micro_batch()
  requests_stop() -> bool      this rank's vote to stop after this step; the trainer all-reduces
                               the votes together with the non-finite-loss check (one collective)
  after_step(step, updated)    updated=False: the step was skipped (non-finite loss)
and once: on_stop(step, checkpoint) when a stop request ended the run early, close() at the end.

loss = (product of the hooks' task_weight) * task loss + sum over hooks of weight * term.

No hook has a state_dict: what they do is a pure function of the step (the KV schedule, the NaN
test steps), frozen (the teacher) or already in the model's checkpoint (the router bias is a
buffer), and a stop request is answered within its own step. Exact resume needs nothing more.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from pikv.config import JobConfig
from pikv.kv.learned import KVTrainState, TrainSchedule, latent_rotary_dims
from pikv.training.distill import Distiller

PREEMPTED_FILE = "preempted.json"  # written when a stop request ended the run; launch/slurm requeues on it
# Tests only: steps whose loss is made NaN (comma-separated), to exercise the non-finite-loss path.
NAN_STEPS_ENV = "PIKV_TEST_NAN_STEPS"


@dataclass
class MicroBatch:
    step: int  # optimizer steps completed before this one
    inputs: Any  # the model's input: a tensor or a tuple of tensors
    output: torch.Tensor  # the model's output (LM: logits)
    task_loss: torch.Tensor


@dataclass
class LossTerms:
    terms: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (weight, term) added to the loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as step means
    task_weight: float = 1.0  # multiplies the task loss (distillation: 1 - distill.weight)


def combine(task_loss: torch.Tensor, parts: list[LossTerms]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch loss and the hooks' metrics (see the module doc)."""
    weight = 1.0
    for p in parts:
        weight *= p.task_weight
    loss = task_loss * weight if weight != 1.0 else task_loss
    metrics: dict[str, torch.Tensor] = {}
    for p in parts:
        for w, term in p.terms:
            loss = loss + w * term
        metrics.update(p.metrics)
    return loss, metrics


class StepHook:
    """Every call a no-op; a hook overrides what it needs."""

    def before_step(self, step: int) -> None:
        pass

    def loss_terms(self, mb: MicroBatch) -> LossTerms:
        return LossTerms()

    def after_micro_batch(self) -> None:
        pass

    def requests_stop(self) -> bool:
        return False

    def after_step(self, step: int, updated: bool) -> None:
        pass

    def on_stop(self, step: int, checkpoint: Optional[Path]) -> None:
        pass

    def close(self) -> None:
        pass


class RouterHook(StepHook):
    """The router losses of every MoE layer (aux_loss, z_loss; weighted by moe.aux_loss_weight /
    moe.z_loss_weight), and for routers balanced without an aux loss (DeepSeek-V3; those with
    `updates_bias_after_step`) the selection-bias update after every optimizer step from the
    step's global token counts, so every rank applies the same update."""

    def __init__(self, model, aux_loss_weight: float, z_loss_weight: float, bias_update_rate: float,
                 world_size: int):
        self.model, self.world_size = model, world_size
        self.aux_loss_weight, self.z_loss_weight, self.rate = aux_loss_weight, z_loss_weight, bias_update_rate
        self.bias_layers = [layer for layer in model.moe_layers() if layer.router.updates_bias_after_step]
        self.counts: list = []

    def before_step(self, step: int) -> None:
        self.counts = [0] * len(self.bias_layers)

    def loss_terms(self, mb: MicroBatch) -> LossTerms:
        router = self.model.router_losses()
        return LossTerms([(self.aux_loss_weight, router["aux_loss"]), (self.z_loss_weight, router["z_loss"])],
                         {"aux_loss": router["aux_loss"], "z_loss": router["z_loss"]})

    def after_micro_batch(self) -> None:
        self.counts = [c + layer.metrics["tokens_per_expert"] for c, layer in zip(self.counts, self.bias_layers)]

    def after_step(self, step: int, updated: bool) -> None:
        if not (updated and self.bias_layers):
            return
        counts_LE = torch.stack(self.counts).float()
        if self.world_size > 1:
            dist.all_reduce(counts_LE)
        for layer, counts_E in zip(self.bias_layers, counts_LE):
            layer.router.update_bias(counts_E, self.rate)


class KVCompressorHook(StepHook):
    """The jointly trained KV compressor (pikv/kv/learned.py): each step's latent rank and mode
    (distillation only / co-training, TrainSchedule: a pure function of the step), set on the
    KVTrainState this hook owns, and its distillation loss (weight kv.attn_error_weight). Logged:
    kv_attn_error (0 on full-cache steps), kv_rank (0 = full cache), kv_cotrain (1 = the LM ran
    through the latent). After the step the model is back on the full cache (validation, checkpoints)."""

    def __init__(self, model, cfg: JobConfig):
        m, kv = cfg.model, cfg.kv
        self.schedule = TrainSchedule(m.num_kv_heads, m.hidden_size // m.num_heads, kv.train_ratios, kv.full_every,
                                      kv.cotrain_start, cfg.train.max_steps, kv.latent_bits, kv.latent_window,
                                      cfg.data.seq_len, latent_rotary_dims(m))
        self.state = KVTrainState.attach(model)
        self.weight = kv.attn_error_weight

    def before_step(self, step: int) -> None:
        self.state.set(*self.schedule.at(step))

    def loss_terms(self, mb: MicroBatch) -> LossTerms:
        distill = self.state.pop_loss()
        rank = torch.tensor(float(self.state.rank or 0), device=distill.device)
        cotrain = torch.tensor(float(self.state.through_latent), device=distill.device)
        return LossTerms([(self.weight, distill)], {"kv_attn_error": distill, "kv_rank": rank, "kv_cotrain": cotrain})

    def after_step(self, step: int, updated: bool) -> None:
        self.state.set(None)


class DistillHook(StepHook):
    """train.mode=distill: (1 - w) * task loss + w * kd_loss + distill.hidden_weight * hidden_mse
    against a frozen teacher (pikv/training/distill.py); logs kd_loss and hidden_mse."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller

    def loss_terms(self, mb: MicroBatch) -> LossTerms:
        parts = self.distiller.losses(mb.inputs, mb.output)
        cfg = self.distiller.cfg
        return LossTerms([(cfg.weight, parts["kd_loss"]), (cfg.hidden_weight, parts["hidden_mse"])], parts,
                         task_weight=1 - cfg.weight)


class NaNInjectionHook(StepHook):
    """Tests only: the losses of the given (1-based) steps are made NaN, gradients included, to
    exercise the trainer's skip-and-stop path ($PIKV_TEST_NAN_STEPS, comma-separated)."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    @classmethod
    def from_env(cls) -> Optional["NaNInjectionHook"]:
        steps = {int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip()}
        return cls(steps) if steps else None

    def loss_terms(self, mb: MicroBatch) -> LossTerms:
        return LossTerms(task_weight=float("nan")) if mb.step + 1 in self.steps else LossTerms()


class PreemptionHook(StepHook):
    """Stop requests: SIGUSR1 (SLURM's --signal warning), SIGTERM (scancel, torchrun shutdown,
    preemption), or the file $PIKV_STOP_FILE that launch/slurm/train.sbatch creates (signals would
    also reach the W&B service process of the job step and kill it). The trainer finishes the step,
    checkpoints and returns; `on_stop` writes run_dir/preempted.json and $PIKV_PREEMPT_FILE (the
    sbatch script requeues on it). Build it first: a signal during setup counts too."""

    def __init__(self, run_dir: Path, is_main: bool, log):
        self.run_dir, self.is_main, self.log = run_dir, is_main, log
        self.signal: Optional[int] = None
        self.stop_file = Path(os.environ["PIKV_STOP_FILE"]) if os.environ.get("PIKV_STOP_FILE") else None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGUSR1, signal.SIGTERM)}
        if is_main:  # a marker of an earlier attempt
            (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def requests_stop(self) -> bool:
        return self.signal is not None or (self.stop_file is not None and self.stop_file.exists())

    def on_stop(self, step: int, checkpoint: Optional[Path]) -> None:
        name = (signal.Signals(self.signal).name if self.signal
                else "the stop file" if self.stop_file is not None and self.stop_file.exists()
                else "a signal on another rank")
        self.log.warning(f"stopped by {name} after step {step}; checkpoint {checkpoint}; "
                         "a restart with train.resume=auto continues from it")
        if self.is_main:
            marker = json.dumps({"step": step, "checkpoint": str(checkpoint), "signal": name})
            (self.run_dir / PREEMPTED_FILE).write_text(marker)
            if os.environ.get("PIKV_PREEMPT_FILE"):
                Path(os.environ["PIKV_PREEMPT_FILE"]).write_text(marker)

    def close(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def build_hooks(cfg: JobConfig, model, ctx, tokenizer_path: Optional[Path],
                amp_dtype: Optional[torch.dtype], teacher=None) -> list[StepHook]:
    """The step hooks `cfg` asks for, in the order their loss terms are added (PreemptionHook is
    built apart, first, by the trainer). `teacher`: distill.teacher's model when already loaded."""
    hooks: list[StepHook] = []
    if cfg.train.mode == "distill":  # the teacher is frozen on this rank's micro-batches, outside the engine
        hooks.append(DistillHook(Distiller.from_checkpoint(cfg.distill, model, tokenizer_path, ctx.device,
                                                           amp_dtype, cfg.data.cache_dir, teacher)))
    moe = cfg.moe
    hooks.append(RouterHook(model, moe.aux_loss_weight, moe.z_loss_weight, moe.bias_update_rate, ctx.world_size))
    nan = NaNInjectionHook.from_env()
    if nan is not None:
        hooks.append(nan)
    if cfg.kv.compressor == "learned":
        hooks.append(KVCompressorHook(model, cfg))
    return hooks
