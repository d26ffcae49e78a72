"""`train.engine=deepspeed`: the same model, data, schedule and checkpoints through
`deepspeed.initialize` (ZeRO stage 0, 1, 2; fp32 on CPU, bf16/fp16 on CUDA).

Expert parallelism stays PiKV's: the AllToAllDispatcher exchanges tokens over our EP group. DeepSpeed
only needs to know which parameters are experts and over which group to reduce (and, under ZeRO,
partition) them. We register our own (ep, edp) groups in `deepspeed.utils.groups` under DeepSpeed's
name `ep_size_<N>`, tag expert parameters the way `deepspeed.moe` does (`allreduce=False`,
`group_name`), and split the optimizer's parameter groups with DeepSpeed's
`split_params_into_different_moe_groups_for_optimizer`. DeepSpeed decides "this model has MoE
layers" by finding a `deepspeed.moe.layer.MoE` module, so a parameter-free marker subclass is
attached (it adds nothing to the state dict).

Gradient math equals the torch engine's: DeepSpeed divides expert gradients by the data-parallel
world size, not the expert-DP group size (engine._reduce_expert_gradients, ZeRO average_tensor), and
ZeRO-1/2 sum the squared norms of all partitions over the world for clipping. ZeRO stage 0 clips
with `clip_grad_norm_`, which averages per-rank norms; under EP those differ (each rank holds other
experts), so at stage 0 DeepSpeed's clipping is off and PiKV clips with the global norm itself.

No C++ op is compiled at run time: the shm comm op build is disabled and the optimizer is torch's
AdamW (a client optimizer), so a CPU run starts in seconds. TORCH_EXTENSIONS_DIR points into the
project cache so nothing lands in ~/.cache/torch_extensions.

Checkpoints: model weights go into the same DCP checkpoint as the torch engine's (so eval, export
and resharding work unchanged). At stage 0 the optimizer is the plain torch AdamW and its state goes
there too; at ZeRO 1/2 it is partitioned, and each rank saves DeepSpeed's own partition state to
`zero_rank_<r>.pt` (resumable at the same world and EP size only; other layouts fail clearly).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from pikv.config import JobConfig
from pikv.data.corpus import resolve_cache_dir
from pikv.distributed import DistContext, GradientReducer
from pikv.distributed.grad_sync import is_expert_param
from pikv.training.optim import build_optimizer, set_lr

ZERO_STATE_FILE = "zero_rank_{rank}.pt"


def _import_deepspeed(device_type: str, cache_dir: Path):
    """Import deepspeed without any run-time C++ build and without writing to shared caches."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir / "torch_extensions"))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ValueError("config key 'train.engine' = 'deepspeed' but deepspeed is not installed "
                         "(pip install 'pikv[deepspeed]' or pip install deepspeed)") from None
    # deepspeed.comm.torch builds its shared-memory all-reduce op (1-2 min of C++) when the
    # backend starts; gloo/nccl do the collectives here, so skip it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def precision(cfg: JobConfig, device_type: str) -> str:
    """'fp32' | 'bf16' | 'fp16' for DeepSpeed: bf16 on CUDA by default, fp32 on CPU."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if dtype == "fp16" and device_type != "cuda":
        raise ValueError("config key 'train.dtype' = 'fp16' is invalid on CPU: DeepSpeed's fp16 loss scaling "
                         "needs CUDA; use fp32 or bf16")
    return dtype


def owned_settings(cfg: JobConfig, world_size: int, device_type: str) -> dict[str, tuple[Any, str]]:
    """DeepSpeed keys PiKV sets from its own config: dotted key -> (value, the PiKV key it comes from)."""
    t = cfg.train
    prec = precision(cfg, device_type)
    return {
        "train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum_steps, "train.grad_accum_steps"),
        "train_batch_size": (t.batch_size * t.grad_accum_steps * world_size,
                             "train.batch_size x train.grad_accum_steps x world size"),
        "gradient_clipping": (t.grad_clip, "train.grad_clip"),
        "zero_optimization.stage": (t.zero_stage, "train.zero_stage"),
        "bf16.enabled": (prec == "bf16", "train.dtype"),
        "fp16.enabled": (prec == "fp16", "train.dtype"),
    }


def build_ds_config(cfg: JobConfig, world_size: int, device_type: str) -> dict:
    """The DeepSpeed JSON: `train.deepspeed_config` (if any) for everything PiKV does not set, plus
    the keys PiKV owns. Where the file sets a PiKV-owned key to another value, that is an error
    naming both (never a silent override); equal values are fine. The optimizer and the LR schedule
    are PiKV's, so `optimizer`/`scheduler` sections are rejected."""
    user: dict = {}
    path = cfg.train.deepspeed_config
    if path is not None:
        try:
            user = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"config key 'train.deepspeed_config' = {path!r}: not valid JSON: {err}") from None
        for section in ("optimizer", "scheduler"):
            if section in user:
                raise ValueError(f"config key 'train.deepspeed_config' = {path!r} has a '{section}' section: PiKV "
                                 "builds AdamW and the LR schedule from train.* (lr, betas, weight_decay, warmup); "
                                 f"remove '{section}' from the file")
    flat = _flatten(user)
    ds = copy.deepcopy(user)
    for key, (value, source) in owned_settings(cfg, world_size, device_type).items():
        if key in flat and flat[key] != value:
            raise ValueError(f"config key 'train.deepspeed_config' = {path!r} sets '{key}' = {flat[key]!r}, but PiKV "
                             f"sets it from {source} = {value!r}; remove it from the file or change {source}")
        _set(ds, key, value)
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW as a client optimizer
    ds.setdefault("steps_per_print", 10 ** 9)  # PiKV logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _moe_marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Parameter-free stand-in that makes DeepSpeed treat the model as MoE (see module doc)."""

        def __init__(self, num_experts: int, ep_size: int, group_name: str):
            nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = num_experts // ep_size

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are PiKV's, registered by _register_expert_groups

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker is a marker, not a layer")

    return ExpertParallelMarker


def _register_expert_groups(ctx: DistContext, name: str) -> None:
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[name] = ctx.ep_group
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = ctx.expert_dp_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ctx.ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ctx.expert_dp_group)


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: JobConfig, ctx: DistContext):
        deepspeed = _import_deepspeed(ctx.device.type, resolve_cache_dir(cfg.data))
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.ctx, self.stage = ctx, cfg.train.zero_stage
        self.precision = precision(cfg, ctx.device.type)
        ds_config = build_ds_config(cfg, ctx.world_size, ctx.device.type)
        # Stage 0: DeepSpeed's clip_grad_norm_ would average per-rank norms; PiKV clips (module doc).
        self.own_clip = cfg.train.grad_clip if self.stage == 0 else 0.0
        if self.stage == 0:
            ds_config["gradient_clipping"] = 0.0
        self.ds_config = ds_config

        expert_names = [n for n, p in model.named_parameters() if p.requires_grad and is_expert_param(n)]
        if ctx.ep_size > 1:
            group_name = f"ep_size_{ctx.ep_size}"
            _register_expert_groups(ctx, group_name)
            params = dict(model.named_parameters())
            for n in expert_names:
                params[n].allreduce = False
                params[n].group_name = group_name
            model.add_module("ds_expert_marker", _moe_marker_class()(cfg.model.num_experts, ctx.ep_size, group_name))

        # The torch engine's groups; under EP DeepSpeed's expert groups split them.
        optimizer = build_optimizer(model, cfg.train,
                                    split_params_into_different_moe_groups_for_optimizer if ctx.ep_size > 1 else None)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model, self.forward = model, self.ds
        self.client_optimizer = optimizer
        # The global-norm clip of the torch engine, used at stage 0 only (grads live in p.grad).
        self.reducer = GradientReducer(model, ctx.world_size, ctx.expert_dp_group, ctx.ep_group)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # PiKV divides by grad_accum_steps itself; the boundary is explicit so DeepSpeed reduces
        # (and ZeRO-2 finishes its reduce-scatter) exactly after the last micro-batch.
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        grad_norm = None
        if self.stage == 0:
            grad_norm = self.reducer.clip_grad_norm_(self.own_clip)
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        if grad_norm is None:
            norm = self.ds.get_global_grad_norm()
            grad_norm = torch.as_tensor(float(norm) if norm is not None else float("nan"))
        return grad_norm.detach()

    def skip_step(self) -> None:
        if self.stage == 0:
            self.ds.zero_grad()
        else:
            # ZeRO 1/2 hold this step's reduced gradients in their partitions; a non-finite
            # gradient norm makes DeepSpeed's step skip the update and clear them (its overflow path).
            self.ds.set_gradient_accumulation_boundary(True)
            self.ds.step()

    @property
    def dcp_optimizer(self) -> Optional[torch.optim.Optimizer]:
        # Stage 0 in fp32: DeepSpeed steps the client AdamW itself; its state reshards through DCP.
        if self.stage == 0 and self.precision == "fp32":
            return self.client_optimizer
        return None

    def save_extra(self, tmp_dir: Path, rank: int) -> None:
        if self.dcp_optimizer is None:
            torch.save(self.optimizer.state_dict(), tmp_dir / ZERO_STATE_FILE.format(rank=rank))

    def load_extra(self, path: Path, rank: int, saved_world: int, saved_ep: int) -> None:
        if self.dcp_optimizer is not None:
            return
        f = path / ZERO_STATE_FILE.format(rank=rank)
        if not f.is_file():
            raise ValueError(f"checkpoint {path} has no DeepSpeed optimizer state {f.name}: it was not saved by "
                             f"train.engine=deepspeed with train.zero_stage={self.stage}; resume it with the "
                             "engine and stage that wrote it")
        if (saved_world, saved_ep) != (self.ctx.world_size, self.ctx.ep_size):
            raise ValueError(f"checkpoint {path} holds ZeRO-{self.stage} optimizer state partitioned over "
                             f"{saved_world} processes (EP={saved_ep}); it resumes on {saved_world} processes with "
                             f"parallel.expert_parallel_size={saved_ep} only (now {self.ctx.world_size}, "
                             f"EP={self.ctx.ep_size}). Model weights reshard: start a new run with "
                             "train.resume=never and load weights, or resume with the same layout")
        # DeepSpeed's loader takes every rank's partition state, indexed by data-parallel rank.
        states = [torch.load(path / ZERO_STATE_FILE.format(rank=r), map_location=self.ctx.device, weights_only=False)
                  for r in range(saved_world)]
        self.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
