"""The training loop: one code path for 1..N processes (torchrun, srun, or plain python).

Per step: grad_accum_steps micro-batches of forward/backward (loss = LM + weighted router
losses), gradient averaging over data/expert-data-parallel groups, clipping, AdamW, then
periodic logging, validation and atomic checkpoints. Resuming restores model, optimizer, RNG
and the global data position, so k steps + resume + (N-k) steps equals N steps exactly.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pikv.config import JobConfig, moe_layer_indices, save_yaml, to_dict
from pikv.data import BlockLoader, iter_eval_batches, prepare_data
from pikv.distributed import DistContext, GradientReducer
from pikv.eval import evaluate_lm
from pikv.logging import WANDB_ID_FILE, MetricsLogger, get_logger
from pikv.models import Transformer
from pikv.models.parallelize import apply_parallelism
from pikv.training.checkpoint import (TrainerState, check_compatible, complete_checkpoints,
                                      load_checkpoint, read_trainer_state, save_checkpoint)
from pikv.training.moe_metrics import MoEMetrics
from pikv.training.optim import build_optimizer
from pikv.training.schedule import lr_at
from pikv.training.throughput import ThroughputMeter, measure_matmul_peak


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Optional[Path]
    losses: dict[int, float]  # global mean loss at every logged step
    final_validation: Optional[dict]


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
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.run_dir / "config.yaml")
        ctx.barrier()
        self.data = prepare_data(cfg, self.run_dir, ctx.is_main, ctx.barrier)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = Transformer(cfg.model, cfg.moe)
        # Counted before expert sharding: the sizes of the whole model, not of this rank's slice.
        self.param_counts = {"num_params": model.num_params(), "num_active_params": model.num_active_params()}
        self.model = apply_parallelism(model, ctx).to(ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.reducer = GradientReducer(self.model, ctx.world_size, ctx.expert_dp_group, ctx.ep_group)
        self.loader = BlockLoader(self.data.tokens["train"], cfg.data.seq_len, cfg.train.batch_size,
                                  ctx.dp_rank, ctx.dp_size, cfg.train.seed)
        self.amp_dtype = autocast_dtype(cfg, ctx.device)
        moe_layers = list(zip(moe_layer_indices(cfg.model, cfg.moe), self.model.moe_layers()))
        self.moe_metrics = MoEMetrics(moe_layers, cfg.model.num_experts, ctx.device)
        # Routers balanced without an aux loss (DeepSeek-V3) adjust a selection bias after every
        # optimizer step from the step's global token counts.
        self.bias_layers = [layer for layer in self.model.moe_layers() if hasattr(layer.router, "update_bias")]
        self.step = 0
        self._maybe_resume()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.train.run_name, to_dict(cfg),
                                     enabled=ctx.is_main, resume_step=self.step)

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
        state = load_checkpoint(path, self.model, self.optimizer, self.ctx)
        self.step = state.step
        self.loader.load_state_dict(state.data_state)
        if state.world_size != self.ctx.world_size:
            self.log.warning(f"resuming {path} saved with world size {state.world_size} on "
                             f"{self.ctx.world_size} processes: weights, optimizer and data position are "
                             "restored; per-rank RNG streams are re-seeded")
        self.log.info(f"resumed from {path} at step {self.step}")

    # ---- one step -------------------------------------------------------------------------
    def _micro_batch_loss(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        amp = (torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else nullcontext())
        with amp:
            logits_BTV = self.model(inputs_BT)
        lm_loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())
        router = self.model.router_losses()
        moe = self.cfg.moe
        loss = lm_loss + moe.aux_loss_weight * router["aux_loss"] + moe.z_loss_weight * router["z_loss"]
        return {"loss": loss, "lm_loss": lm_loss, "aux_loss": router["aux_loss"], "z_loss": router["z_loss"]}

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg.train
        lr = lr_at(self.step + 1, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}
        step_counts = [0] * len(self.bias_layers)
        for _ in range(cfg.grad_accum_steps):
            inputs_BT, targets_BT = (t.to(self.ctx.device, non_blocking=True) for t in self.loader.next_batch())
            parts = self._micro_batch_loss(inputs_BT, targets_BT)
            (parts["loss"] / cfg.grad_accum_steps).backward()
            self.moe_metrics.accumulate()
            step_counts = [c + layer.metrics["tokens_per_expert"] for c, layer in zip(step_counts, self.bias_layers)]
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / cfg.grad_accum_steps
        self.reducer.reduce()
        grad_norm = self.reducer.clip_grad_norm_(cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bias_layers:
            self._update_router_biases(step_counts)
        self.step += 1
        return {**sums, "grad_norm": grad_norm.detach(), "lr": torch.tensor(lr)}

    def _update_router_biases(self, step_counts: list[torch.Tensor]) -> None:
        counts_LE = torch.stack(step_counts).float()
        if self.ctx.world_size > 1:
            dist.all_reduce(counts_LE)  # every rank applies the same update to its bias copy
        for layer, counts_E in zip(self.bias_layers, counts_LE):
            layer.router.update_bias(counts_E, self.cfg.moe.bias_update_rate)

    def _global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(values)
        packed = torch.stack([values[k].float().to(self.ctx.device) for k in keys])
        if self.ctx.world_size > 1:
            dist.all_reduce(packed)
            packed /= self.ctx.world_size
        return dict(zip(keys, packed.tolist()))

    # ---- evaluation and checkpoints -------------------------------------------------------
    def validate(self, split: str = "validation", max_batches: Optional[int] = None) -> dict:
        batches = iter_eval_batches(self.data.tokens[split], self.cfg.data.seq_len, self.cfg.train.batch_size,
                                    self.ctx.dp_rank, self.ctx.dp_size, max_batches=max_batches)
        return evaluate_lm(self.model, batches, self.data.byte_lengths, self.ctx.device, self.amp_dtype).to_dict()

    def save(self) -> Path:
        state = TrainerState(step=self.step, data_state=self.loader.state_dict(), config=to_dict(self.cfg),
                             world_size=self.ctx.world_size, ep_size=self.ctx.ep_size)
        path = save_checkpoint(self.ckpt_root, state, self.model, self.optimizer, self.ctx,
                               self.data.tokenizer_path, self.cfg.train.keep_checkpoints)
        self.log.info(f"saved checkpoint {path}")
        return path

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * ctx.dp_size
        peak = measure_matmul_peak(ctx.device, self.amp_dtype or torch.float32)
        meter = ThroughputMeter(self.model.flops_per_token(cfg.data.seq_len), peak, ctx.world_size)
        self.log.info(f"model: {self.param_counts['num_params']:,} parameters, "
                      f"{self.param_counts['num_active_params']:,} active "
                      f"per token; {ctx.world_size} process(es), EP={ctx.ep_size}, device {ctx.device}; "
                      f"measured matmul peak {peak / 1e9:.1f} GFLOP/s per process")
        if ctx.is_main:
            (self.run_dir / "model_summary.json").write_text(json.dumps(
                {**self.param_counts, "world_size": ctx.world_size, "ep_size": ctx.ep_size,
                 "tokens_per_step": tokens_per_step}, indent=1))
        losses: dict[int, float] = {}
        last_ckpt, validation = None, None
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not (ctx.is_main and cfg.logging.progress),
                   dynamic_ncols=True, desc="train")
        self.model.train()
        stop_at = cfg.train.exit_at_step or cfg.train.max_steps
        while self.step < stop_at:
            out = self.train_step()
            meter.add(tokens_per_step)
            bar.update(1)
            log_now = self.step % cfg.logging.log_every == 0 or self.step == stop_at
            if log_now:
                row = self._global_mean(out) | meter.read() | self.moe_metrics.read()
                losses[self.step] = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                self.metrics.log(row, self.step)
            if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps:
                validation = self.validate(max_batches=cfg.train.eval_batches)
                self.metrics.log({f"val/{k}": v for k, v in validation.items()}, self.step)
                self.log.info(f"step {self.step}: val loss {validation['nll']:.4f}, "
                              f"bits/byte {validation['bits_per_byte']:.4f}")
            if self.step % cfg.train.checkpoint_every == 0 or self.step == stop_at:
                last_ckpt = self.save()
        bar.close()
        if ctx.is_main and self.moe_metrics.history:
            heatmap = self.moe_metrics.save_heatmap(self.run_dir / "expert_load.png")
            self.metrics.log_image("moe/expert_load", heatmap, self.step)
        self.metrics.close()
        return TrainResult(self.run_dir, last_ckpt or self._resume_path(), losses, validation)
