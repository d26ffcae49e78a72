"""Apply data x expert parallelism, activation checkpointing and torch.compile to a model built
identically on every rank, in torchtitan's `parallelize` order (EP, then AC, then compile): the
model code itself knows nothing about process groups, recomputation or compilation.

Every rank builds the full model from the same seed, then keeps only its slice of each MoE
layer's stacked expert weights, so an EP run starts from exactly the weights of the
single-process run (what the parity tests rely on). At real scale one would build the model on
the meta device and materialise only the local slice; the slicing logic stays the same.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pikv.config import TrainConfig
from pikv.distributed import DistContext
from pikv.models.activation_checkpoint import apply_activation_checkpointing
from pikv.moe.ep_dispatch import AllToAllDispatcher
from pikv.moe.layer import MoELayer


def shard_experts(layer: MoELayer, ep_size: int, ep_rank: int) -> None:
    """Keep experts [ep_rank*L, (ep_rank+1)*L) of a MoE layer (L = E / ep_size)."""
    experts = layer.experts
    local = layer.num_experts // ep_size
    lo = ep_rank * local
    # Every parameter of an experts module is stacked [E, ...] (weights, LoRA adapters).
    for name, full in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(full.detach()[lo:lo + local].clone(), requires_grad=full.requires_grad))
    experts.num_experts = local


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block of `model.layers` in place (torchtitan's `apply_compile`: the
    blocks repeat, so one compiled graph serves them all and compilation stays short).

    In one process a block is one graph, every router and the dropless and capacity paths alike
    (the expert loop is an opaque custom op, pikv/moe/experts.py); so it is under data
    parallelism (the aux loss's all-reduce is traced). Under expert parallelism each MoE layer
    has two graph breaks by design: the all-to-all dispatch and combine run eagerly, since their
    split sizes are data-dependent host integers (pikv/moe/ep_dispatch.py).
    """
    # Under activation checkpointing a compiled block does not replay its side outputs (aux_loss,
    # metrics, ...) in the recompute: what the eager path gets from restoring them
    # (pikv/models/activation_checkpoint.py), counted once.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.layers:
        block.compile()
    return model


def apply_parallelism(model: nn.Module, ctx: DistContext, train: Optional[TrainConfig] = None) -> nn.Module:
    """Shard experts over the EP group and make router statistics global; then, as `train` asks
    (train.activation_checkpointing, train.compile), checkpoint and compile the blocks.
    Returns the model."""
    for module in model.modules():
        if isinstance(module, MoELayer) and ctx.world_size > 1:
            module.stats_group = torch.distributed.group.WORLD
    apply_expert_parallelism(model, ctx)
    return apply_ac_and_compile(model, train) if train is not None else model


def apply_expert_parallelism(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Keep this EP rank's experts of every MoE layer and route tokens to their owners through the
    all-to-all dispatcher (no-op when ctx.ep_size == 1). Training (apply_parallelism) and decoding
    (pikv/inference) share it; decoding leaves the routing statistics local (no aux loss to make
    global, so no all-reduce per layer). Works on a model on the meta device too. Returns the model."""
    if ctx.ep_size > 1:
        for module in model.modules():
            if isinstance(module, MoELayer):
                shard_experts(module, ctx.ep_size, ctx.ep_rank)
                module.dispatcher = AllToAllDispatcher(ctx.ep_group, ctx.ep_size, ctx.ep_rank)
    return model


def apply_ac_and_compile(model: nn.Module, train: TrainConfig) -> nn.Module:
    """train.activation_checkpointing, then train.compile (torchtitan's order: the compiled
    graph contains the checkpointed region). Parameter names do not change. Returns the model."""
    apply_activation_checkpointing(model, train.activation_checkpointing)
    return apply_compile(model) if train.compile else model
