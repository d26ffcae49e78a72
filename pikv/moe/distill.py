"""Knowledge distillation, one implementation for both of its users: the MoE layer's own teacher
(`create_moe('pikv', ..., use_distillation=True)`, LoRAMoELayer.set_teacher / distill_mse) and
the trainer's train.mode=distill (pikv/training/distill.py, a whole teacher checkpoint).

Shapes: V vocab. Both hold their teacher as a `FrozenTeacher` (outside the student's module tree,
eval mode, no gradient) and compare outputs with `hidden_mse`; the trainer adds `kd_loss` on the
logits. Here, below pikv.training, so that the layer may use it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class FrozenTeacher:
    """A teacher module run in eval mode under torch.no_grad (and bf16 autocast when `amp_dtype`
    is given). Not an nn.Module, so a student holding one does not register the teacher: it is
    in no optimizer, state dict, `parameters()` or engine."""

    def __init__(self, module: nn.Module, amp_dtype: Optional[torch.dtype] = None):
        self.module = module.eval().requires_grad_(False)
        self.amp_dtype = amp_dtype

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        device_type = inputs[0].device.type
        amp = (torch.autocast(device_type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else nullcontext())
        with amp:
            return self.module(*inputs)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a student's output against its teacher's, in fp32."""
    return F.mse_loss(student.float(), teacher.float())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over V, mean over tokens (fp32).
    Softened by T, scaled by T^2 so its gradients stay on the scale of the hard loss (Hinton,
    Vinyals & Dean 2015)."""
    s_logp = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    return temperature ** 2 * kl
