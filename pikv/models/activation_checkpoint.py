"""Activation checkpointing of transformer blocks (torchtitan's `apply_ac`), MoE-safe.

Each block of `model.layers` runs under `torch.utils.checkpoint` (non-reentrant: the aux and z
losses a MoE layer leaves on itself are part of the graph without being block outputs, which the
reentrant variant would cut off). Parameter names stay as they are (no wrapper module), so
checkpoints, the gradient reducer's `experts` rule and DeepSpeed's groups see the same model.

What the MoE needs from a recompute, and how it gets it:
- identical routing: the global CPU/CUDA RNG is restored by `preserve_rng_state` (noisy_topk's
  noise); a router's own `generator` is restored here. sigmoid_topk's bias only moves after the
  optimizer step, so it is the same in forward and recompute; the other routers are functions of
  their input.
- statistics counted once: a MoE layer's per-forward results (`aux_loss`, `z_loss`, `metrics`)
  are put back to the original forward's objects once a recompute ends, and the KV compressor's
  training state (`kv_train_state`, pikv/kv/learned.py) records nothing during a recompute, so whatever reads them after backward (the trainer's load metrics and
  aux-loss-free bias counts) sees one forward's values, and no recomputed graph stays alive
  through them.

`selective` is op-level (torchtitan's `_apply_op_sac`): the outputs of matmuls, attention and
the experts' op are kept, everything else (norms, RoPE, SiLU, softmax, routing, dispatch
permutations, the EP all-to-all) is recomputed. Those are the expensive FLOPs, while the
elementwise results are most of the tensors; one block's activations are thus mostly kept but
the recompute costs little.
"""

from __future__ import annotations

import functools
import types
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")
# Attributes a module sets in forward as a side output (MoELayer, the KV compressor).
_FORWARD_OUTPUTS = ("aux_loss", "z_loss", "metrics")


def _saved_ops() -> set:
    """The ops whose outputs `selective` keeps: matmuls, attention kernels, the experts."""
    names = ("mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}
    return ops | {torch.ops.pikv.swiglu_loop.default}


def _selective_policy(saved: set) -> Callable:
    def policy(ctx, op, *args, **kwargs):
        # Under no_grad (sinkhorn's balancing) nothing is needed for backward; and torch.matmul
        # of a vector squeezes its mm output in place, which a saved tensor must not see.
        if op in saved and torch.is_grad_enabled():
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


class _BlockState:
    """One forward of one block: the side outputs to put back and the router generators."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.holders = [m for m in block.modules() if any(hasattr(m, a) for a in _FORWARD_OUTPUTS)]
        self.generators = [m.generator for m in block.modules() if getattr(m, "generator", None) is not None]
        self.gen_before: list[torch.Tensor] = []
        self.gen_after: list[torch.Tensor] = []
        self.outputs: list[dict] = []

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.gen_before = [g.get_state() for g in self.generators]
        yield
        self.gen_after = [g.get_state() for g in self.generators]
        self.outputs = [{a: getattr(m, a) for a in _FORWARD_OUTPUTS if hasattr(m, a)} for m in self.holders]

    @contextmanager
    def recompute(self) -> Iterator[None]:
        for g, state in zip(self.generators, self.gen_before):
            g.set_state(state)
        # Looked up now: the trainer attaches its KV state after checkpointing is applied.
        kv_states = {id(s): s for m in self.block.modules()
                     if (s := getattr(m, "kv_train_state", None)) is not None}
        try:
            with ExitStack() as stack:
                for s in kv_states.values():
                    stack.enter_context(s.replaying())
                yield
        finally:  # also on checkpoint's early stop, which ends a recompute with an exception
            for g, state in zip(self.generators, self.gen_after):
                g.set_state(state)
            for m, values in zip(self.holders, self.outputs):
                for name, value in values.items():
                    setattr(m, name, value)


def _contexts(block: nn.Module, policy: Callable | None):
    state = _BlockState(block)
    if policy is None:
        return state.forward(), state.recompute()
    sac_fwd, sac_re = create_selective_checkpoint_contexts(policy)
    return _both(sac_fwd, state.forward()), _both(sac_re, state.recompute())


@contextmanager
def _both(first, second) -> Iterator[None]:
    with first, second:
        yield


def _checkpointed_forward(block: nn.Module, *args, policy: Callable | None, **kwargs):
    """The forward of a checkpointed block (bound to it, so a deepcopy rebinds to the copy)."""
    forward = functools.partial(type(block).forward, block)
    if not (block.training and torch.is_grad_enabled()):  # nothing to save: eval, generation
        return forward(*args, **kwargs)
    if not torch.compiler.is_compiling():
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=functools.partial(_contexts, block, policy), **kwargs)
    # Traced by dynamo as one region whose side outputs are not replayed in the recompute
    # (pikv.models.parallelize.apply_compile); a selective policy is all it takes.
    if policy is None:
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, policy), **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block of `model.layers` ('full' or 'selective', see the module doc;
    'none' leaves the model as it is). Returns the model."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is invalid: allowed values are "
                         f"{', '.join(AC_MODES)}")
    if mode == "none":
        return model
    policy = _selective_policy(_saved_ops()) if mode == "selective" else None
    for block in model.layers:
        # An instance attribute shadows the class's forward: nn.Module.__call__ runs it, and the
        # block keeps its place (and parameter names) in the model.
        block.forward = types.MethodType(functools.partial(_checkpointed_forward, policy=policy), block)
    return model
