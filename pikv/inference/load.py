"""A checkpoint -> a model ready to decode on this rank, its experts split over the ranks.

Expert parallelism at decode time: with W processes every MoE layer keeps experts
[r*E/W, (r+1)*E/W) on rank r and routes through the training all-to-all dispatcher
(pikv/moe/ep_dispatch.py). The model is built on the meta device and sharded before any weight is
allocated, so no rank ever holds more than its own experts; the checkpoint then fills exactly the
local slices (experts are stored by global index as DTensor shards, pikv/training/checkpoint.py),
whatever EP size it was trained with: an EP=2 checkpoint decodes at W=1, 2 or 4, a non-EP
checkpoint at W=2 or 4.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pikv.config import JobConfig, from_dict, moe_layer_indices
from pikv.distributed import DistContext
from pikv.models import Transformer
from pikv.models.parallelize import apply_expert_parallelism
from pikv.models.transformer import model_rope
from pikv.tasks import check_job
from pikv.training.checkpoint import load_checkpoint, read_trainer_state, resolve_checkpoint


def stored_config(ckpt: Path, state) -> JobConfig:
    """The run's config, checked as a new job would be; checkpoints from before a KV feature get
    the setting they were trained with."""
    cfg = from_dict(state.config)  # keys added since take the value it was written under (ADDED)
    if "kv" not in state.config:  # trained before the KV compressor existed
        cfg.kv.compressor = "none"
    return check_job(cfg)


def read_job(checkpoint: Path) -> tuple[Path, JobConfig]:
    """(the resolved step_<N> directory, its checked config); ValueError for a missing or
    incomplete checkpoint and for a task other than lm."""
    ckpt = resolve_checkpoint(Path(checkpoint))
    cfg = stored_config(ckpt, read_trainer_state(ckpt))
    if cfg.task != "lm":
        raise ValueError(f"checkpoint {ckpt} is a task={cfg.task!r} model: generation needs a language model "
                         "(task 'lm'); evaluate it with train/eval.py")
    return ckpt, cfg


def check_expert_split(cfg: JobConfig, world_size: int) -> None:
    """ValueError unless `world_size` ranks can split the experts evenly."""
    E = cfg.model.num_experts
    if moe_layer_indices(cfg.model, cfg.moe) and E % world_size:
        allowed = [w for w in range(1, E + 1) if E % w == 0]
        raise ValueError(f"world size {world_size} does not divide model.num_experts={E}: expert parallelism "
                         f"splits the experts evenly over the ranks; run with a world size in {allowed}")


def _materialise(model: nn.Module, cfg: JobConfig, device: torch.device) -> None:
    """Meta -> uninitialised storage on `device`; every persistent tensor is then loaded from the
    checkpoint, and what is not stored (the head's tie, RoPE's tables) is rebuilt here."""
    model.to_empty(device=device)
    if cfg.model.tie_embeddings:  # to_empty gives every module its own storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = model_rope(cfg.model).to(device)
    saved = set(model.state_dict())
    derived = {name for name, _ in model.named_buffers() if name not in saved}
    assert derived <= {"rope.cos_TR", "rope.sin_TR"}, f"buffers not in the checkpoint, left uninitialised: {derived}"


def load_for_decoding(ckpt: Path, cfg: JobConfig, ctx: DistContext) -> Transformer:
    """The model of checkpoint `ckpt` (its config `cfg`, from read_job) in eval mode, with this
    rank's experts only: EP over all ctx.world_size ranks, so ctx.ep_size must equal it. ValueError
    (the same on every rank) for a world size that does not divide the experts or unusable files."""
    check_expert_split(cfg, ctx.world_size)
    if moe_layer_indices(cfg.model, cfg.moe) and ctx.ep_size != ctx.world_size:
        raise ValueError(f"decoding splits the experts over every rank: ep_size {ctx.ep_size} != world size "
                         f"{ctx.world_size} (init_distributed(ep_size=world size))")
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv)
    apply_expert_parallelism(model, ctx)
    _materialise(model, cfg, ctx.device)
    load_checkpoint(ckpt, model, None, ctx)
    return model.eval()
