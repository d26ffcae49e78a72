"""Knowledge distillation from a frozen teacher checkpoint (train.mode=distill).

Shapes: B batch, T tokens, V vocab, H hidden.
loss = (1 - w) * LM + w * T^2 * KL(teacher_T || student_T) + hidden_weight * sum of hidden-state
MSEs after the chosen blocks (+ the router losses); the trainer's DistillHook
(pikv/training/hooks.py) applies the weights. The teacher and the losses are those of the MoE
layer's own distillation (pikv/moe/distill.py); averaged over tokens like the LM loss, so
data-parallel ranks averaging their losses give the global-batch value.

The teacher is an ordinary PiKV checkpoint (dense or MoE), rebuilt from its stored config,
loaded whole on every rank and run on that rank's own micro-batch: eval mode, torch.no_grad,
no optimizer, never passed to an engine (DeepSpeed wraps only the student).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pikv.config import DistillConfig, KVConfig, ModelConfig, MoEConfig
from pikv.data import load_tokenizer
from pikv.data.tokenizer import tokenizer_hash
from pikv.models import Transformer
from pikv.models.hf import load_pretrained_transformer
from pikv.models.pretrained import is_pretrained, resolve_pretrained
from pikv.moe.distill import FrozenTeacher, hidden_mse, kd_loss
from pikv.training.checkpoint import load_model_weights, read_trainer_state, resolve_checkpoint


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, Path]:
    """Rebuild the model of a PiKV checkpoint (step_<N> or run directory) from its stored config
    and load its weights; returns (frozen model in eval mode, the checkpoint directory)."""
    ckpt = resolve_checkpoint(Path(path))
    stored = read_trainer_state(ckpt).config

    def section(cls, name):  # only the architecture; keys missing from an older checkpoint take defaults
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.get(name, {}).items() if k in known})

    # The KV compressor (if trained in) is built too, so upcycling can copy it; unused at full cache.
    model = Transformer(section(ModelConfig, "model"), section(MoEConfig, "moe"), kv_cfg=section(KVConfig, "kv"))
    load_model_weights(ckpt, model)
    model.to(device).eval().requires_grad_(False)
    return model, ckpt


def load_hf_teacher(spec: str, cache_dir: str = "", max_seq_len: Optional[int] = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """A pretrained Hugging Face model (folder, .gguf or alias: pikv/models/pretrained.py) as a dense
    pikv Transformer, frozen in eval mode (the start of model.init_from_hf, or a teacher)."""
    model = load_pretrained_transformer(resolve_pretrained(spec, cache_dir=cache_dir), max_seq_len)
    return model.to(device).eval().requires_grad_(False)


def check_same_tokenizer(teacher_ckpt: Path, student_tokenizer: Optional[Path]) -> None:
    """The KD loss compares distributions over token ids: both models must use one tokenizer."""
    teacher_tok = teacher_ckpt / "tokenizer.json"
    if student_tokenizer is None or not teacher_tok.is_file():
        raise ValueError(f"distill.teacher = {str(teacher_ckpt)!r}: cannot compare tokenizers (teacher "
                         f"{teacher_tok} exists: {teacher_tok.is_file()}, student tokenizer: {student_tokenizer}); "
                         "distillation needs the teacher's and the student's tokenizer.json")
    if teacher_tok.read_bytes() != Path(student_tokenizer).read_bytes():
        raise ValueError(f"distill.teacher = {str(teacher_ckpt)!r} was trained with a different tokenizer "
                         f"({teacher_tok}) than this run ({student_tokenizer}); distillation needs the same "
                         "tokenizer: use the teacher's data.* settings (source, tokenizer, model.vocab_size)")


def check_same_hf_tokenizer(spec: str, model_path: Path, student_tokenizer: Optional[Path]) -> None:
    """As check_same_tokenizer, for a pretrained teacher: its own tokenizer must be the student's."""
    teacher_tok = load_tokenizer(str(model_path))
    if student_tokenizer is None or tokenizer_hash(load_tokenizer(str(student_tokenizer))) != tokenizer_hash(teacher_tok):
        raise ValueError(f"distill.teacher = {spec!r}: its tokenizer differs from this run's ({student_tokenizer}); "
                         "distillation needs the same tokenizer: leave data.tokenizer unset with model.init_from_hf")


class _Capture:
    """Forward hooks keeping the outputs of chosen blocks of a model (the last forward's)."""

    def __init__(self, model: Transformer, layers: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [model.layers[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, i: int):
        def hook(module, args, output):
            self.outputs[i] = output
        return hook


class Distiller:
    """The teacher and the distillation loss of one rank."""

    def __init__(self, cfg: DistillConfig, student: Transformer, teacher: Transformer,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None):
        self.cfg = cfg
        self.teacher = FrozenTeacher(teacher.to(device), amp_dtype)
        t, s = teacher.cfg, student.cfg
        if t.vocab_size != s.vocab_size:
            raise ValueError(f"distill.teacher = {cfg.teacher!r} has model.vocab_size={t.vocab_size}, the student "
                             f"{s.vocab_size}; logit distillation needs the same vocabulary")
        layers = sorted(set(cfg.hidden_layers))
        if layers and (t.hidden_size != s.hidden_size or max(layers) >= t.num_layers):
            raise ValueError(f"distill.hidden_layers = {layers}: the hidden-state MSE needs the teacher's "
                             f"hidden_size ({t.hidden_size}) to equal the student's ({s.hidden_size}) and every "
                             f"index < the teacher's num_layers ({t.num_layers})")
        self.layers = layers
        self.student_capture = _Capture(student, layers)
        self.teacher_capture = _Capture(teacher, layers)

    @classmethod
    def from_checkpoint(cls, cfg: DistillConfig, student: Transformer, student_tokenizer: Optional[Path],
                        device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                        cache_dir: str = "", loaded: Optional[Transformer] = None) -> "Distiller":
        """The teacher of `cfg.teacher` (a PiKV checkpoint, or a pretrained HF model: folder, .gguf or
        alias, e.g. the original of a retrofit; `loaded`: that model, already loaded by
        load_hf_teacher), after checking it shares the student's tokenizer."""
        if is_pretrained(cfg.teacher):
            teacher = loaded if loaded is not None else load_hf_teacher(cfg.teacher, cache_dir,
                                                                         student.cfg.max_seq_len, device)
            check_same_hf_tokenizer(cfg.teacher, resolve_pretrained(cfg.teacher, "distill.teacher", cache_dir),
                                    student_tokenizer)
        else:
            teacher, ckpt = load_teacher(cfg.teacher, device)
            check_same_tokenizer(ckpt, student_tokenizer)
        return cls(cfg, student, teacher, device, amp_dtype)

    def losses(self, inputs_BT: torch.Tensor, student_logits_BTV: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the teacher on the same batch (after the student's forward, whose hidden states the
        hooks hold): {"kd_loss": KD of the logits, "hidden_mse": sum of the chosen blocks' MSEs}."""
        teacher_BTV = self.teacher(inputs_BT)
        kd = kd_loss(student_logits_BTV, teacher_BTV, self.cfg.temperature)
        hidden = torch.zeros((), device=student_logits_BTV.device)
        for i in self.layers:
            hidden = hidden + hidden_mse(self.student_capture.outputs[i], self.teacher_capture.outputs[i])
        return {"kd_loss": kd, "hidden_mse": hidden}


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Trainable vs total parameters, and the optimizer state the frozen ones do not need: AdamW
    keeps two fp32 moments per trained parameter (8 bytes each)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"num_trainable_params": trainable, "num_frozen_params": total - trainable,
            "optimizer_state_bytes": 8 * trainable, "optimizer_state_bytes_saved": 8 * (total - trainable)}
