"""The checks of a job configuration that need no builder: each key's range and choices, the rules
between sections, and the error types every builder raises (OptionError, invalid_key)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pikv.config.schema import FlexConfig, JobConfig, ModelConfig, MoEConfig, TrainConfig


CHOICES: dict[str, tuple[str, ...]] = {
    "train.mode": ("lm", "distill"),
    "train.engine": ("torch", "deepspeed"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "fp32", "bf16", "fp16"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "logging.wandb_mode": ("online", "offline", "disabled"),
    "kv.compressor": ("auto", "none", "learned"),
    "task": ("lm", "flex", "time"),
    "flex.missing": ("random", "structured", "none"),
    "data.errors": ("strict", "replace"),
}
RESUME_MODES = ("auto", "never")  # train.resume: one of these, or a checkpoint path

class OptionError(ValueError):
    """A builder's bad argument: `arg`=`value` and what is allowed. `allowed` may name other
    arguments as {name} placeholders, filled from `refs` as `name=value`, or as `key=value` when
    the error is re-raised with config keys (`config_keys`)."""

    def __init__(self, arg: str, value: Any, allowed: str, **refs: Any):
        self.arg, self.value, self.allowed, self.refs = arg, value, allowed, refs
        super().__init__(f"{arg}={value!r} {self._allowed({})}")

    def _allowed(self, keys: dict[str, str]) -> str:
        if not self.refs:
            return self.allowed
        return self.allowed.format(**{n: f"{keys.get(n, n)}={v}" for n, v in self.refs.items()})

    def keyed(self, keys: dict[str, str]) -> ValueError:
        """The same error in config terms: `config key 'k' = value is invalid: ...`."""
        allowed = self._allowed(keys)
        verb = "" if allowed.startswith("is ") else "is invalid: "
        return ValueError(f"config key '{keys[self.arg]}' = {self.value!r} {verb}{allowed}")


@contextmanager
def config_keys(keys: dict[str, str]):
    """Re-raise a builder's OptionError about an argument in `keys` (argument -> config key)
    with the config key: the builder names its arguments, a job names its keys."""
    try:
        yield
    except OptionError as err:
        if err.arg not in keys:
            raise
        raise err.keyed(keys) from None


def invalid_key(key: str, value: Any, allowed: str) -> None:
    """Raise the ValueError of a bad config value: the key, the value and what is allowed."""
    raise ValueError(f"config key '{key}' = {value!r} is invalid: {allowed}")


def _check_choice(key: str, value: str) -> None:
    if value not in CHOICES[key]:
        invalid_key(key, value, f"allowed values are {', '.join(CHOICES[key])}")


def _check_positive(cfg: JobConfig, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            invalid_key(key, value, "must be > 0")


def moe_layer_indices(model: ModelConfig, moe: MoEConfig) -> list[int]:
    """Indices of the transformer layers whose FFN is a MoE layer; ValueError naming the key when
    moe.layers / moe.every_n_layers cannot be placed in model.num_layers layers."""
    if moe.layers is not None:
        if any(not 0 <= i < model.num_layers for i in moe.layers):
            invalid_key("moe.layers", list(moe.layers), f"indices must be in [0, {model.num_layers})")
        return sorted(set(moe.layers))
    if moe.every_n_layers < 0:
        invalid_key("moe.every_n_layers", moe.every_n_layers, "must be >= 0 (0 = no MoE layer)")
    if moe.every_n_layers == 0:
        return []
    n = moe.every_n_layers
    return [i for i in range(model.num_layers) if (i + 1) % n == 0]


def default_latent_window(seq_len: int, ratios: list[float]) -> int:
    """kv.latent_window when unset: 8 tokens (measured on the default model: docs/benchmarks.md,
    "KV cache"), or fewer for short sequences, so that the window never takes more than half of
    the smallest budget (seq_len / max ratio tokens)."""
    return min(8, int(seq_len // (2 * max(ratios)))) if ratios else 0


def resolve(cfg: JobConfig) -> JobConfig:
    """A copy with the defaults that depend on other keys filled in (kv.compressor 'auto',
    kv.latent_window null), so config.yaml and checkpoints record the numbers. Checks nothing."""
    kv = cfg.kv
    compressor = kv.compressor
    if compressor == "auto":
        compressor = "learned" if cfg.task == "lm" else "none"
    window = kv.latent_window
    if window is None and compressor == "learned":
        window = default_latent_window(cfg.data.seq_len, kv.train_ratios)
    return dataclasses.replace(cfg, kv=dataclasses.replace(kv, compressor=compressor, latent_window=window))


def validate(cfg: JobConfig) -> JobConfig:
    """The checks that need no builder: each key's type, range and choices, and cross-key rules
    between sections. Builders check their own options (pikv.tasks.check_job runs them all).
    Reads `cfg` only; raises ValueError naming the key, the value and what is allowed."""
    _check_positive(
        cfg, "model.vocab_size", "model.num_layers", "model.ffn_hidden_size", "model.max_seq_len",
        "data.seq_len", "train.max_steps", "train.batch_size", "train.grad_accum_steps", "train.lr",
        "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
        "parallel.expert_parallel_size", "logging.log_every",
    )
    for key in ("train.engine", "train.activation_checkpointing", "train.device", "train.dtype",
                "parallel.backend", "logging.wandb_mode",
                "train.mode", "task", "kv.compressor", "flex.missing", "data.errors"):
        section, _, name = key.rpartition(".")
        _check_choice(key, getattr(getattr(cfg, section), name) if section else getattr(cfg, name))
    if not 0.0 < cfg.model.rotary_fraction <= 1.0:
        invalid_key("model.rotary_fraction", cfg.model.rotary_fraction, "must be in (0, 1] (1.0 = RoPE on every dim)")
    moe_layer_indices(cfg.model, cfg.moe)
    if not cfg.moe.bias_update_rate >= 0:
        invalid_key("moe.bias_update_rate", cfg.moe.bias_update_rate, "must be >= 0 (0 = bias never moves)")
    ep = cfg.parallel.expert_parallel_size
    if cfg.model.num_experts % ep:
        invalid_key("parallel.expert_parallel_size", ep, f"must divide model.num_experts={cfg.model.num_experts}")
    _validate_data(cfg)
    _validate_train(cfg.train)
    _validate_lora(cfg.model)
    _validate_engine(cfg.train, ep)
    _validate_kv(cfg)
    _validate_distill(cfg)
    _validate_flex(cfg.flex)
    _validate_time(cfg)
    return cfg


def _validate_data(cfg: JobConfig) -> None:
    if cfg.data.seq_len > cfg.model.max_seq_len:
        invalid_key("data.seq_len", cfg.data.seq_len, f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    for key in ("validation_docs", "heldout_docs"):
        if getattr(cfg.data, key) < 0:
            invalid_key(f"data.{key}", getattr(cfg.data, key), "must be >= 0 (0: split by ranges)")


def _validate_train(t: TrainConfig) -> None:
    if t.resume not in RESUME_MODES and not Path(t.resume).exists():
        invalid_key("train.resume", t.resume, f"allowed values are {', '.join(RESUME_MODES)}, or an existing checkpoint path")
    if t.exit_at_step is not None and not 0 < t.exit_at_step <= t.max_steps:
        invalid_key("train.exit_at_step", t.exit_at_step, f"must be in [1, train.max_steps={t.max_steps}] or null")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        invalid_key("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    if t.warmup_steps < 0:
        invalid_key("train.warmup_steps", t.warmup_steps, "must be >= 0")
    if not t.run_name or "/" in t.run_name:
        invalid_key("train.run_name", t.run_name, "must be a non-empty name without '/'")
    if t.max_nonfinite_steps < 0:
        invalid_key("train.max_nonfinite_steps", t.max_nonfinite_steps, "must be >= 0 (0 = stop at the first NaN/inf loss)")
    for i, group in enumerate(t.param_groups):
        if not group.lr > 0:
            invalid_key(f"train.param_groups[{i}].lr", group.lr, "must be > 0")


def _validate_lora(m: ModelConfig) -> None:
    if m.lora_rank < 0:
        invalid_key("model.lora_rank", m.lora_rank, "must be >= 0 (0 = no LoRA adapters)")
    if not m.lora_alpha > 0:
        invalid_key("model.lora_alpha", m.lora_alpha, "must be > 0 (adapter scale = alpha / rank)")
    if not 0.0 <= m.lora_dropout < 1.0:
        invalid_key("model.lora_dropout", m.lora_dropout, "must be in [0, 1)")
    if m.lora_rank and not m.lora_targets:
        invalid_key("model.lora_targets", m.lora_targets, "must name at least one nn.Linear glob when lora_rank > 0")


def _validate_kv(cfg: JobConfig) -> None:
    """The compressor's budgets (kv.train_ratios, latent_bits, latent_window) are checked by the
    KV layer (pikv.kv.budgets.check_latent_budgets); these are the schedule's plain ranges."""
    kv = cfg.kv
    if cfg.task != "lm" and kv.compressor not in ("auto", "none"):
        invalid_key("kv.compressor", kv.compressor, f"the KV compressor is for task=lm; task={cfg.task} needs 'none'")
    if not 0.0 <= kv.cotrain_start <= 1.0:
        invalid_key("kv.cotrain_start", kv.cotrain_start, "must be in [0, 1] (1 = the compressor trains on the side only)")
    if kv.full_every < 0:
        invalid_key("kv.full_every", kv.full_every, "must be >= 0 (0 = never a full-cache step)")
    if kv.attn_error_weight < 0:
        invalid_key("kv.attn_error_weight", kv.attn_error_weight, "must be >= 0")
    if kv.pca_init_windows < 0 or (kv.pca_init_windows and kv.compressor == "none"):
        invalid_key("kv.pca_init_windows", kv.pca_init_windows, "must be >= 0, and 0 with kv.compressor=none")


def _validate_distill(cfg: JobConfig) -> None:
    t, d, m = cfg.train, cfg.distill, cfg.model
    if (t.mode == "distill" or t.init_from) and cfg.task != "lm":
        invalid_key("train.mode/init_from", (t.mode, t.init_from), f"distillation and upcycling are for task=lm, not {cfg.task}")
    # Paths are checked when loaded (resolve_checkpoint), not here: a stored config must stay
    # loadable (eval, export) after its teacher directory is gone.
    if m.init_from_hf and cfg.task != "lm":
        invalid_key("model.init_from_hf", m.init_from_hf, f"a pretrained Hugging Face model is for task=lm, not {cfg.task}")
    if m.init_from_hf and t.init_from:
        invalid_key("train.init_from", t.init_from, f"cannot be combined with model.init_from_hf={m.init_from_hf!r}: "
                    "both give the initial weights")
    if t.mode == "distill" and not d.teacher:
        invalid_key("distill.teacher", d.teacher, "train.mode=distill needs the teacher's checkpoint path")
    if t.mode != "distill" and d.teacher:
        invalid_key("distill.teacher", d.teacher, "is only used with train.mode=distill")
    if not 0.0 <= d.weight <= 1.0:
        invalid_key("distill.weight", d.weight, "must be in [0, 1] (0 = LM loss only, 1 = KD only)")
    if not 0 < d.temperature < float("inf"):
        invalid_key("distill.temperature", d.temperature, "must be a finite number > 0")
    if d.hidden_weight < 0:
        invalid_key("distill.hidden_weight", d.hidden_weight, "must be >= 0")
    if any(not 0 <= i < m.num_layers for i in d.hidden_layers):
        invalid_key("distill.hidden_layers", list(d.hidden_layers), f"indices must be in [0, {m.num_layers})")


def _validate_engine(t: TrainConfig, ep: int) -> None:
    if t.engine != "deepspeed":
        if t.zero_stage != 0:
            invalid_key("train.zero_stage", t.zero_stage, "needs train.engine=deepspeed (the torch engine has no ZeRO)")
        if t.deepspeed_config is not None:
            invalid_key("train.deepspeed_config", t.deepspeed_config, "needs train.engine=deepspeed")
        if t.dtype == "fp16":
            invalid_key("train.dtype", t.dtype, "fp16 (with loss scaling) needs train.engine=deepspeed; "
                  "the torch engine allows auto, fp32, bf16")
        return
    if t.zero_stage not in (0, 1, 2, 3):
        invalid_key("train.zero_stage", t.zero_stage, "allowed values are 0, 1, 2, 3")
    if t.zero_stage == 3 and ep > 1:
        invalid_key("train.zero_stage", t.zero_stage,
              f"ZeRO-3 cannot be combined with parallel.expert_parallel_size={ep}: DeepSpeed's MoE support "
              "partitions expert parameters over the expert-data-parallel group, which stage 3's parameter "
              "partitioning does not support; use zero_stage 0, 1 or 2 with expert parallelism")
    if t.deepspeed_config is not None and not Path(t.deepspeed_config).is_file():
        invalid_key("train.deepspeed_config", t.deepspeed_config, "must be an existing DeepSpeed JSON file")


def _validate_flex(f: FlexConfig) -> None:
    if not 0.0 <= f.missing_rate < 1.0:
        invalid_key("flex.missing_rate", f.missing_rate, "must be in [0, 1)")
    if not (0 < f.heldout_fraction < 1 and 0 < f.validation_fraction < 1
            and f.heldout_fraction + f.validation_fraction < 1):
        invalid_key("flex.heldout_fraction/validation_fraction", (f.heldout_fraction, f.validation_fraction),
              "each must be in (0, 1) and their sum < 1")


def _validate_time(cfg: JobConfig) -> None:
    tc = cfg.time
    if tc.context_len < 1 or (cfg.task == "time" and tc.context_len > cfg.model.max_seq_len):
        invalid_key("time.context_len", tc.context_len, f"must be in [1, model.max_seq_len={cfg.model.max_seq_len}]")
    if not tc.heads or any(h < 1 for h in tc.heads) or len(set(tc.heads)) != len(tc.heads):
        invalid_key("time.heads", list(tc.heads), "must be a non-empty list of distinct horizons >= 1")
    if not tc.eval_horizons or any(h < 1 for h in tc.eval_horizons):
        invalid_key("time.eval_horizons", list(tc.eval_horizons), "must be a non-empty list of horizons >= 1")
    if not tc.huber_delta > 0:
        invalid_key("time.huber_delta", tc.huber_delta, "must be > 0")
    if not 0 < tc.train_fraction < 1:
        invalid_key("time.train_fraction", tc.train_fraction, "must be in (0, 1)")
