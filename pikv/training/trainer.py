"""The training loop: one code path for 1..N processes (torchrun, srun, or plain python).

Per step: grad_accum_steps micro-batches of forward/backward (loss = the task's loss + the step
hooks' weighted terms: router losses, KV compressor, distillation; pikv/training/hooks.py), the
engine's gradient reduction, clipping and AdamW, then periodic logging, validation and atomic
checkpoints. Resuming restores model, optimizer, RNG and the global data position, so k steps +
resume + (N-k) steps equals N steps exactly.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from pikv.config import JobConfig, moe_layer_indices, save_yaml, to_dict
from pikv.distributed import DistContext
from pikv.kv.fit import pca_init_
from pikv.logging import WANDB_ID_FILE, MetricsLogger, get_logger
from pikv.models.freeze import freeze_parameters
from pikv.models.parallelize import apply_parallelism
from pikv.training.checkpoint import (TrainerState, check_compatible, complete_checkpoints,
                                      load_checkpoint, read_trainer_state, save_checkpoint)
from pikv.training.distill import load_hf_teacher, load_teacher, parameter_report
from pikv.training.engines import build_engine
from pikv.training.hooks import MicroBatch, PreemptionHook, build_hooks, combine
from pikv.training.moe_metrics import MoEMetrics
from pikv.training.schedule import lr_at
from pikv.tasks import build_task
from pikv.training.throughput import ThroughputMeter, measure_matmul_peak
from pikv.training.upcycle import upcycle


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Optional[Path]
    losses: dict[int, float]  # global mean loss at every logged step
    final_validation: Optional[dict]
    preempted: bool = False  # stopped early by a stop request (PreemptionHook), with a checkpoint


class NonFiniteLossError(RuntimeError):
    pass


def _to_device(batch, device: torch.device):
    """A tensor or a tuple of tensors, on `device`."""
    if isinstance(batch, tuple):
        return tuple(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


def autocast_dtype(cfg: JobConfig, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless asked."""
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Trainer:
    def __init__(self, cfg: JobConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.log = get_logger(ctx.rank)
        self.run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        preemption = PreemptionHook(self.run_dir, ctx.is_main, self.log)  # first: setup can be signalled too
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.run_dir / "config.yaml")
        ctx.barrier()
        # The task (pikv/tasks: lm | flex | time) owns data, model, task loss and evaluation.
        self.task = build_task(cfg, self.run_dir, ctx)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        pretrained = None
        if self._resume_path() is None:  # a resumed run restores its own weights, never these
            pretrained = self._initial_weights(model)
        freeze_parameters(model, cfg.train.freeze)  # before the engine: no optimizer state for them
        # Counted before expert sharding: the sizes of the whole model, not of this rank's slice.
        self.param_counts = {"num_params": model.num_params(), "num_active_params": model.num_active_params(),
                             **parameter_report(model)}
        self.model = apply_parallelism(model, ctx, cfg.train).to(ctx.device)
        self.engine = build_engine(self.model, cfg, ctx)
        self.loader = self.task.loader
        # DeepSpeed bf16/fp16 converts the module itself; autocast only for the torch engine.
        self.amp_dtype = autocast_dtype(cfg, ctx.device) if cfg.train.engine == "torch" else None
        # Router losses and bias, KV compressor, distillation, test NaNs, stop requests: pikv/training/hooks.py
        # the original model is also the teacher of a retrofit (distill.teacher = model.init_from_hf): loaded once
        teacher = pretrained if cfg.distill.teacher and cfg.distill.teacher == cfg.model.init_from_hf else None
        del pretrained
        self.hooks = build_hooks(cfg, self.model, ctx, self.task.tokenizer_path, self.amp_dtype,
                                 teacher) + [preemption]
        moe_layers = list(zip(moe_layer_indices(cfg.model, cfg.moe), self.model.moe_layers()))
        self.moe_metrics = MoEMetrics(moe_layers, cfg.model.num_experts, ctx.device)
        self.step = 0
        self.nonfinite_steps = 0
        self.stop_requested = False
        self._maybe_resume()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.train.run_name, to_dict(cfg),
                                     enabled=ctx.is_main, resume_step=self.step)

    def _initial_weights(self, model):
        """A fresh run's start: a PiKV checkpoint (train.init_from) or a pretrained HF model
        (model.init_from_hf, loaded from the same files on every rank), copied in by upcycling
        (pikv/training/upcycle.py: dense FFNs as they are, MoE experts as copies of the FFN).
        Returns the pretrained model (frozen, a dense pikv Transformer) or None."""
        cfg, pretrained = self.cfg, None
        if cfg.train.init_from:
            upcycle(model, load_teacher(cfg.train.init_from)[0])
        elif cfg.model.init_from_hf:
            pretrained = load_hf_teacher(cfg.model.init_from_hf, cfg.data.cache_dir, cfg.model.max_seq_len)
            upcycle(model, pretrained, "model.init_from_hf")
        if cfg.kv.pca_init_windows:  # after the weights: the PCA of *their* keys and values
            pca_init_(model, self.task.calibration_windows(cfg.kv.pca_init_windows))
        return pretrained

    # ---- resume -------------------------------------------------------------------------
    def _resume_path(self) -> Optional[Path]:
        mode = self.cfg.train.resume
        if mode == "never":
            return None
        if mode == "auto":
            found = complete_checkpoints(self.ckpt_root)
            return found[-1] if found else None
        return Path(mode)

    def _maybe_resume(self) -> None:
        path = self._resume_path()
        if path is None:
            if self.ctx.is_main:  # a fresh run must not continue an old W&B run of the same name
                (self.run_dir / WANDB_ID_FILE).unlink(missing_ok=True)
            return
        stored = read_trainer_state(path)
        check_compatible(stored.config, to_dict(self.cfg), path)
        stored_in_dcp = stored.engine == "torch" or stored.zero_stage == 0
        if self.engine.dcp_optimizer is not None and not stored_in_dcp:
            raise ValueError(f"checkpoint {path} was written by train.engine={stored.engine} with "
                             f"train.zero_stage={stored.zero_stage} (partitioned optimizer state); resume it with "
                             "that engine and stage, not train.engine="
                             f"{self.cfg.train.engine}/zero_stage={self.cfg.train.zero_stage}")
        state = load_checkpoint(path, self.model, self.engine.dcp_optimizer, self.ctx)
        self.engine.load_extra(path, self.ctx.rank, state.world_size, state.ep_size)
        self.step = state.step
        self.loader.load_state_dict(state.data_state)
        if state.world_size != self.ctx.world_size:
            self.log.warning(f"resuming {path} saved with world size {state.world_size} on "
                             f"{self.ctx.world_size} processes: weights, optimizer and data position are "
                             "restored; per-rank RNG streams are re-seeded")
        self.log.info(f"resumed from {path} at step {self.step}")

    # ---- one step -------------------------------------------------------------------------
    def _micro_batch_loss(self, inputs, targets) -> dict[str, torch.Tensor]:
        """inputs: a tensor or a tuple of tensors (the model's positional arguments); the task
        turns the output into its loss terms (LM: cross-entropy of the logits), the hooks add theirs."""
        amp = (torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else nullcontext())
        with amp:
            output = self.engine.forward(*inputs) if isinstance(inputs, tuple) else self.engine.forward(inputs)
        task_parts = self.task.loss_parts(output, targets)
        micro = MicroBatch(self.step, inputs, output, task_parts[self.task.loss_key])
        loss, hook_metrics = combine(micro.task_loss, [h.loss_terms(micro) for h in self.hooks])
        return {"loss": loss, **task_parts, **hook_metrics}

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg.train
        lr = lr_at(self.step + 1, cfg)
        self.engine.set_lr(lr)
        for hook in self.hooks:
            hook.before_step(self.step)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum_steps):
            inputs, targets = (_to_device(t, self.ctx.device) for t in self.loader.next_batch())
            parts = self._micro_batch_loss(inputs, targets)
            self.engine.backward(parts["loss"] / cfg.grad_accum_steps, last=micro == cfg.grad_accum_steps - 1)
            self.moe_metrics.accumulate()
            for hook in self.hooks:
                hook.after_micro_batch()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / cfg.grad_accum_steps
        nonfinite = self._agree_on_skip_and_stop(sums["loss"])
        if nonfinite:
            self.engine.skip_step()
            out = {"grad_norm": torch.tensor(float("nan")), "skipped_nonfinite": torch.tensor(1.0)}
        else:
            out = {"grad_norm": self.engine.step()}
        for hook in self.hooks:
            hook.after_step(self.step, updated=not nonfinite)
        self.step += 1
        if nonfinite:
            self._count_nonfinite()
        return {**sums, "lr": torch.tensor(lr), **out}

    def _agree_on_skip_and_stop(self, loss: torch.Tensor) -> bool:
        """One small all-reduce per step, for two decisions every rank must take together: skip a
        step whose loss is NaN/inf on any rank (returned), and stop after this step when any rank's
        hook asks (self.stop_requested)."""
        stop = any(hook.requests_stop() for hook in self.hooks)
        flags = torch.tensor([float(not torch.isfinite(loss).item()), float(stop)], device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flags[1])
        return bool(flags[0])

    def _count_nonfinite(self) -> None:
        self.nonfinite_steps += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.log.warning(f"step {self.step}: non-finite loss on some rank, step skipped "
                         f"({self.nonfinite_steps} of at most train.max_nonfinite_steps={limit})")
        if self.nonfinite_steps > limit:
            found = complete_checkpoints(self.ckpt_root)
            raise NonFiniteLossError(
                f"step {self.step}: the loss was NaN/inf for the {self.nonfinite_steps}th time, more than "
                f"train.max_nonfinite_steps={limit}; stopping. Last good checkpoint: "
                f"{found[-1] if found else 'none (no checkpoint written yet)'} (lower train.lr or resume from it)")

    def _global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        packed = torch.stack([values[k].float().to(self.ctx.device) for k in keys])
        if self.ctx.world_size > 1:
            dist.all_reduce(packed)
            packed /= self.ctx.world_size
        return dict(zip(keys, packed.tolist()))

    # ---- evaluation and checkpoints -------------------------------------------------------
    def validate(self, split: str = "validation", max_batches: Optional[int] = None) -> dict:
        return self.task.evaluate(self.model, split, max_batches, self.ctx.device, self.amp_dtype)

    def save(self) -> Path:
        state = TrainerState(step=self.step, data_state=self.loader.state_dict(), config=to_dict(self.cfg),
                             world_size=self.ctx.world_size, ep_size=self.ctx.ep_size)
        state.engine, state.zero_stage = self.cfg.train.engine, self.cfg.train.zero_stage
        path = save_checkpoint(self.ckpt_root, state, self.model, self.engine.dcp_optimizer, self.ctx,
                               self.task.tokenizer_path, self.cfg.train.keep_checkpoints,
                               write_extra=lambda tmp: self.engine.save_extra(tmp, self.ctx.rank))
        self.log.info(f"saved checkpoint {path}")
        return path

    # ---- the loop -------------------------------------------------------------------------
    def _report_model(self, tokens_per_step: int, peak: float) -> None:
        ctx, pc = self.ctx, self.param_counts
        self.log.info(f"model: {pc['num_params']:,} parameters, {pc['num_active_params']:,} active "
                      f"per token; {ctx.world_size} process(es), EP={ctx.ep_size}, device {ctx.device}; "
                      f"measured matmul peak {peak / 1e9:.1f} GFLOP/s per process")
        self.log.info(f"trainable: {pc['num_trainable_params']:,} of {pc['num_params']:,} parameters "
                      f"({pc['num_frozen_params']:,} frozen: {pc['optimizer_state_bytes_saved'] / 2**20:.1f} MiB of "
                      f"AdamW state saved, {pc['optimizer_state_bytes'] / 2**20:.1f} MiB kept)")
        if ctx.is_main:
            (self.run_dir / "model_summary.json").write_text(json.dumps(
                {**pc, "world_size": ctx.world_size, "ep_size": ctx.ep_size, "tokens_per_step": tokens_per_step},
                indent=1))

    def fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        tokens_per_step = self.task.tokens_per_micro_batch * cfg.train.grad_accum_steps * ctx.dp_size
        peak = measure_matmul_peak(ctx.device, self.amp_dtype or torch.float32)
        meter = ThroughputMeter(self.task.flops_per_token(self.model), peak, ctx.world_size)
        self._report_model(tokens_per_step, peak)
        losses: dict[int, float] = {}
        last_ckpt, validation = None, None
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (ctx.is_main and cfg.logging.progress),
                   dynamic_ncols=True, desc="train")
        self.model.train()
        stop_at = cfg.train.exit_at_step or cfg.train.max_steps
        preempted = False
        while self.step < stop_at:
            out = self.train_step()
            meter.add(tokens_per_step)
            bar.update(1)
            if self.step % cfg.logging.log_every == 0 or self.step == stop_at:
                row = self._global_mean(out) | meter.read() | self.moe_metrics.read()
                losses[self.step] = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                self.metrics.log(row, self.step)
            if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps:
                validation = self.validate(max_batches=cfg.train.eval_batches)
                self.metrics.log({f"val/{k}": v for k, v in validation.items()}, self.step)
                self.log.info(f"step {self.step}: {self.task.describe(validation)}")
            if self.step % cfg.train.checkpoint_every == 0 or self.step == stop_at or self.stop_requested:
                last_ckpt = self.save()
            if self.stop_requested and self.step < stop_at:
                preempted = True
                for hook in self.hooks:
                    hook.on_stop(self.step, last_ckpt)
                break
        self._finish(bar)
        return TrainResult(self.run_dir, last_ckpt or self._resume_path(), losses, validation, preempted)

    def _finish(self, bar) -> None:
        for hook in self.hooks:
            hook.close()
        bar.close()
        if self.ctx.is_main and self.moe_metrics.history:
            heatmap = self.moe_metrics.save_heatmap(self.run_dir / "expert_load.png")
            self.metrics.log_image("moe/expert_load", heatmap, self.step)
        self.metrics.close()
