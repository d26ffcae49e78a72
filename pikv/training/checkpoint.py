"""Atomic, resumable checkpoints on torch.distributed.checkpoint (DCP).

Layout of `<run>/checkpoints/step_<N>/`:
  .metadata, __*.distcp   model + optimizer (DCP; FQN-keyed, so it reshards across world sizes)
  rank_<r>.pt             that rank's RNG states (CPU, CUDA, numpy, python)
  tokenizer.json          the tokenizer the model was trained with
  trainer.json            step, data position, world/EP sizes and the resolved config; written
                          last, so its presence marks a complete checkpoint
Every rank writes into `step_<N>.tmp/`; after a barrier rank 0 renames it to `step_<N>/`. A
rename is atomic on POSIX, so a kill at any moment leaves either the old set of complete
checkpoints or the new one, never a half-written `step_<N>/` that `resume=auto` would pick.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from pikv.distributed import DistContext
from pikv.distributed.grad_sync import is_expert_param

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_FILE = "trainer.json"
FORMAT_VERSION = 1


@dataclass
class TrainerState:
    step: int
    data_state: dict
    config: dict
    world_size: int
    ep_size: int
    engine: str = "torch"  # train.engine that wrote it (its optimizer state layout)
    zero_stage: int = 0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (renamed from .tmp and holding trainer.json), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: Path) -> Path:
    """A step_<N> directory, or a run / checkpoints directory (its newest complete checkpoint)."""
    if (path / TRAINER_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise ValueError(f"--checkpoint {path}: no complete checkpoint there (expected a step_<N> directory "
                     "holding trainer.json, or a run directory with checkpoints/step_<N>/)")


def _expert_placement(ctx: DistContext):
    # Experts are replicated over expert-DP and sharded over EP by global expert index (dim 0);
    # DCP stores that layout and reshards on load, so EP=2 checkpoints load at EP=1 or EP=4.
    return [Replicate(), Shard(0)]


def _wrap_experts(model_sd: dict, optim_sd: dict, ctx: DistContext) -> tuple[dict, dict]:
    """Expert tensors (weights and their Adam moments) as DTensors over the (edp, ep) mesh."""
    def wrap(t):
        return DTensor.from_local(t, ctx.mesh, _expert_placement(ctx), run_check=False)

    model_sd = {k: wrap(v) if is_expert_param(k) else v for k, v in model_sd.items()}
    state = {}
    for fqn, entry in optim_sd["state"].items():
        state[fqn] = ({k: wrap(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in entry.items()}
                      if is_expert_param(fqn) else entry)
    return model_sd, {**optim_sd, "state": state}


def _dcp_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ctx: DistContext) -> dict:
    """{"model": ..., "optim": ...} for DCP; without an optimizer (an engine that saves its own
    optimizer state, e.g. DeepSpeed ZeRO partitions) only the model."""
    if optimizer is None:
        model_sd = {k: DTensor.from_local(v, ctx.mesh, _expert_placement(ctx), run_check=False)
                    if is_expert_param(k) else v for k, v in get_model_state_dict(model).items()}
        return {"model": model_sd}
    model_sd, optim_sd = _wrap_experts(*get_state_dict(model, optimizer), ctx)
    return {"model": model_sd, "optim": optim_sd}


def _unwrap(tree):
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: _unwrap(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unwrap(v) for v in tree]
    return tree


def save_checkpoint(ckpt_root: Path, state: TrainerState, model: nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], ctx: DistContext,
                    tokenizer_file: Optional[Path], keep: int,
                    write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Every rank writes its part into step_<N>.tmp/; `write_extra(tmp_dir)` (every rank) adds
    engine-owned files before trainer.json marks the checkpoint complete."""
    final = ckpt_root / f"step_{state.step}"
    tmp = ckpt_root / f"step_{state.step}.tmp"
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a save that was killed
        shutil.rmtree(final, ignore_errors=True)  # re-saving a step (e.g. after a restart)
        tmp.mkdir()
    ctx.barrier()
    dcp.save(_dcp_state(model, optimizer, ctx), checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rank_{ctx.rank}.pt")
    if write_extra is not None:
        write_extra(tmp)
    ctx.barrier()
    if ctx.is_main:
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        meta = {"format_version": FORMAT_VERSION, "step": state.step, "data_state": state.data_state,
                "world_size": state.world_size, "ep_size": state.ep_size, "engine": state.engine,
                "zero_stage": state.zero_stage, "config": state.config}
        with open(tmp / TRAINER_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def read_trainer_state(path: Path) -> TrainerState:
    """Parse trainer.json of a checkpoint; errors name the file and what is wrong with it."""
    meta_file = path / TRAINER_FILE
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist or is not a directory")
    if not meta_file.is_file():
        raise ValueError(f"checkpoint {path} is incomplete: {meta_file} is missing "
                         "(a save was interrupted; use an earlier step_<N> directory)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint file {meta_file} is corrupt: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint file {meta_file} has format_version {meta.get('format_version')!r}; "
                         f"this PiKV reads format_version {FORMAT_VERSION}")
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {path} is corrupt: the DCP file {path / '.metadata'} is missing")
    return TrainerState(step=meta["step"], data_state=meta["data_state"], config=meta["config"],
                        world_size=meta["world_size"], ep_size=meta["ep_size"],
                        engine=meta.get("engine", "torch"), zero_stage=meta.get("zero_stage", 0))


def check_compatible(stored: dict, current: dict, path: Path) -> None:
    """The model architecture must match exactly; anything else (lr, steps, ...) may change."""
    diffs = [f"model.{k}: checkpoint {stored['model'].get(k)!r} vs config {v!r}"
             for k, v in current["model"].items() if stored["model"].get(k) != v]
    for key in ("every_n_layers", "layers", "router", "num_shared_experts", "shared_ffn_hidden_size"):
        if stored["moe"].get(key) != current["moe"].get(key):
            diffs.append(f"moe.{key}: checkpoint {stored['moe'].get(key)!r} vs config {current['moe'].get(key)!r}")
    # LoRA experts change the parameter set; checkpoints older than these keys were 'base'.
    lora_keys = (("lora_rank", 8), ("share_base", False)) if current["moe"].get("kind") == "pikv" else ()
    for key, default in (("kind", "base"),) + lora_keys:
        if stored["moe"].get(key, default) != current["moe"].get(key, default):
            diffs.append(f"moe.{key}: checkpoint {stored['moe'].get(key, default)!r} vs config "
                         f"{current['moe'].get(key, default)!r}")
    if diffs:
        raise ValueError(f"checkpoint {path} is incompatible with the configured model: " + "; ".join(diffs))


def _describe(err: BaseException) -> str:
    """DCP wraps per-rank failures (a BaseException, not an Exception); name the real cause."""
    if isinstance(err, CheckpointException):
        causes = {repr(e[0] if isinstance(e, tuple) else e) for e in err.failures.values()}
        return "; ".join(sorted(causes)) + " (truncated or corrupt .distcp files?)"
    return f"{type(err).__name__}: {err}"


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model weights (evaluation, export); works in one process."""
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP raises many types; all mean "unusable files"
        raise ValueError(f"checkpoint {path}: cannot load model weights: {_describe(err)}") from None
    model.load_state_dict(state["model"])


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    ctx: DistContext) -> TrainerState:
    """Restore model, optimizer (None: model only) and this rank's RNG; returns the trainer state."""
    state = read_trainer_state(path)
    loaded = _dcp_state(model, optimizer, ctx)
    try:
        dcp.load(loaded, checkpoint_id=path)
    except (Exception, CheckpointException) as err:
        raise ValueError(f"checkpoint {path}: cannot load model/optimizer state: {_describe(err)}") from None
    loaded = _unwrap(loaded)
    if optimizer is None:
        set_model_state_dict(model, loaded["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    rng_file = path / f"rank_{ctx.rank}.pt"
    if state.world_size == ctx.world_size and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
