"""Upcycling: initialise a MoE student from a dense (or MoE) checkpoint (train.init_from).

Sparse upcycling (Komatsuzaki et al. 2023): attention, embeddings, norms and LM head are copied;
each MoE layer's experts all start as the teacher's FFN at that layer (for LoRA experts: their
base; adapters start at B = 0). The router keeps its random init: with identical experts and
gate weights that sum to 1 (renormalize=True, route_scale=1) the layer output is the teacher's
FFN output whatever the routing, so the student equals the teacher at step 0 up to float
rounding of the weighted sum (max |logit difference| <= 1e-4 in fp32, tests/unit/test_lora_distill.py).
That holds for softmax_topk, noisy_topk and sigmoid_topk with renormalize=True; sinkhorn (not
renormalised, Megatron) and expert_choice (a token may get 0 or several experts) start close to,
not at, the teacher.
Routing then diversifies as the experts (or their adapters) see different tokens.

From a MoE checkpoint: experts are copied when the counts match (router too), or each teacher
expert is replicated E_student / E_teacher times (router re-initialised) when that divides.
"""

from __future__ import annotations

import torch
from torch import nn

from pikv.moe import FeedForward, LoRAGroupedExperts, MoELayer


def _expert_weights(layer: MoELayer) -> tuple[torch.Tensor, ...]:
    experts = layer.experts
    if isinstance(experts, LoRAGroupedExperts):
        return tuple(w.detach() for w in experts.merged_weights())
    return experts.w1_EHF.detach(), experts.w3_EHF.detach(), experts.w2_EFH.detach()


def _set_expert_base(layer: MoELayer, w1_EHF, w3_EHF, w2_EFH, where: str) -> None:
    experts = layer.experts
    if isinstance(experts, LoRAGroupedExperts) and experts.shared_base is not None:
        if not (w1_EHF == w1_EHF[:1]).all() or not (w2_EFH == w2_EFH[:1]).all():
            raise ValueError(f"{where}: moe.share_base=true needs identical source experts (a dense teacher); "
                             "this checkpoint's experts differ: use moe.share_base=false")
        base = experts.shared_base
        base.gate_proj.weight.copy_(w1_EHF[0].t())
        base.up_proj.weight.copy_(w3_EHF[0].t())
        base.down_proj.weight.copy_(w2_EFH[0].t())
        return
    for name, w in (("w1_EHF", w1_EHF), ("w3_EHF", w3_EHF), ("w2_EFH", w2_EFH)):
        getattr(experts, name).copy_(w)


def _upcycle_mlp(student: nn.Module, teacher: nn.Module, where: str) -> None:
    if isinstance(student, FeedForward):
        if not isinstance(teacher, FeedForward):
            raise ValueError(f"{where}: the student layer is dense but the checkpoint's is MoE; "
                             "make that layer MoE too (moe.every_n_layers / moe.layers)")
        student.load_state_dict(teacher.state_dict())  # shape mismatch -> a clear torch error
        return
    assert isinstance(student, MoELayer)
    E = student.num_experts
    F_student = (student.experts.base_weights()[0] if isinstance(student.experts, LoRAGroupedExperts)
                 else student.experts.w1_EHF).shape[2]
    if student.shared_experts is not None:
        raise ValueError(f"{where}: upcycling into moe.num_shared_experts > 0 is not supported (the shared "
                         "experts would change the output at step 0); use moe.num_shared_experts=0")
    if isinstance(teacher, FeedForward):
        w1, w3, w2 = teacher.gate_proj.weight.t(), teacher.up_proj.weight.t(), teacher.down_proj.weight.t()
        if w1.shape[1] != F_student:
            raise ValueError(f"{where}: the teacher's FFN width {w1.shape[1]} differs from the student's "
                             f"model.expert_ffn_hidden_size={F_student}; set it to {w1.shape[1]} to upcycle")
        _set_expert_base(student, *(w.unsqueeze(0).expand(E, -1, -1) for w in (w1, w3, w2)), where)
        return
    w1, w3, w2 = _expert_weights(teacher)
    E_t = w1.shape[0]
    if w1.shape[2] != F_student or E % E_t:
        raise ValueError(f"{where}: cannot upcycle {E_t} experts of width {w1.shape[2]} into {E} experts of "
                         f"width {F_student}: the widths must match and {E_t} must divide {E}")
    rep = E // E_t  # student expert e starts as teacher expert e // rep
    _set_expert_base(student, *(w.repeat_interleave(rep, dim=0) for w in (w1, w3, w2)), where)
    if rep == 1:
        student.router.load_state_dict(teacher.router.state_dict())


@torch.no_grad()
def upcycle(student: nn.Module, teacher: nn.Module, source: str = "train.init_from") -> None:
    """Copy `teacher` (a pikv Transformer, dense or MoE) into `student` (a full, unsharded
    Transformer): everything outside the FFNs must have equal shapes; see the module doc. `source`
    (the config key the teacher came from) starts every error message."""
    s_cfg, t_cfg = student.cfg, teacher.cfg
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        if getattr(s_cfg, key) != getattr(t_cfg, key):
            raise ValueError(f"{source}: model.{key} of the checkpoint ({getattr(t_cfg, key)}) differs from "
                             f"this model's ({getattr(s_cfg, key)}); upcycling keeps everything outside the FFNs")
    t_sd = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if ".mlp." in name or ((".kv_compressor." in name or ".lora_" in name) and name not in t_sd):
            continue  # FFNs below; a KV compressor or LoRA adapters the checkpoint lacks keep their init
        if name not in t_sd or t_sd[name].shape != tensor.shape:
            raise ValueError(f"{source}: the checkpoint has no {name} of shape {tuple(tensor.shape)}; "
                             "upcycling copies everything outside the FFNs")
        tensor.copy_(t_sd[name])
    for i, (s_block, t_block) in enumerate(zip(student.layers, teacher.layers)):
        _upcycle_mlp(s_block.mlp, t_block.mlp, f"{source}: layer {i}")

