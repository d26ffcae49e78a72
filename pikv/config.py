"""Typed job configuration: the schema, its defaults and the checks that need no builder.

Defaults live here (the tiny CPU model); `configs/*.yaml` holds only what differs; CLI dotlist
overrides (`train.max_steps=10`) come last. This is lingua's/OLMo-core's layering, built on
OmegaConf structured configs so an unknown key or a wrong type is rejected by the schema itself.
`validate` checks each key's range and choices and the rules between sections; every builder
(create_moe, the routers, the model, the KV compressor, the data pipeline) checks its own options,
and `pikv.tasks.check_job` runs them all before any work. Every error names the key, the bad value
and what is allowed. This module imports nothing from pikv: it is the bottom of the layering.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    vocab_size: int = 2048  # the BPE tokenizer is trained to exactly this size
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2  # grouped-query attention: num_heads % num_kv_heads == 0
    ffn_hidden_size: int = 512  # dense (non-MoE) SwiGLU layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # RoPE on the first rotary_fraction * head_dim dims of each head, the rest position-free
    # (GPT-NeoX rotary_pct, HF partial_rotary_factor); 1.0 = every dim (Llama).
    rotary_fraction: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_hidden_size: int = 256
    # Start from a pretrained Hugging Face Llama-family model (docs/retrofit.md): a model folder
    # (config.json + weights), a .gguf file, or an alias fetched into the cache ('smollm2'). The
    # architecture keys above come from its config (a key set to another value is an error), the FFNs
    # are dense unless moe.* asks for MoE layers (sparse upcycling), data.tokenizer defaults to it.
    # Weights are loaded at step 0 only: a resumed run restores its own checkpoint. '' = random init.
    init_from_hf: str = ""
    # LoRA adapters (pikv/models/lora_linear.py) on the nn.Linear modules whose names match
    # lora_targets (globs); their base weights are frozen. 0 = none. Part of the architecture, so every
    # model rebuilt from a checkpoint's config (eval, export, resume, a teacher) has the same parameters.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapter adds (alpha / rank) * x A B
    lora_targets: list[str] = field(default_factory=lambda: ["layers.*.self_attn.*_proj"])
    lora_dropout: float = 0.0  # dropout on the adapter's input (training only)


@dataclass
class MoEConfig:
    # Which layers are MoE: `layers` (explicit indices) wins over `every_n_layers`, which makes
    # layers n-1, 2n-1, ... MoE (every_n_layers=1: all layers; 0: none, a dense model).
    every_n_layers: int = 1
    layers: Optional[list[int]] = None
    router: str = "softmax_topk"  # see pikv/moe/router.py
    renormalize: bool = True  # Mixtral: the k gate weights sum to 1
    capacity_factor: Optional[float] = None  # None = dropless (expert_choice: 1.0)
    aux_loss_weight: float = 0.01  # Switch/GShard load-balancing loss
    z_loss_weight: float = 0.001  # ST-MoE router z-loss
    num_shared_experts: int = 0  # DeepSeekMoE always-active experts (a dense SwiGLU)
    shared_ffn_hidden_size: Optional[int] = None  # per shared expert; None = model.expert_ffn_hidden_size
    bias_update_rate: float = 0.001  # sigmoid_topk: aux-loss-free bias step (DeepSeek-V3 gamma)
    route_scale: float = 1.0  # gate weights are multiplied by this
    sinkhorn_iterations: int = 30  # sinkhorn router: fixed iteration count (no host sync)
    # 'base' (GroupedExperts) | 'pikv' (LoRA experts, pikv/moe/lora.py; docs/distillation.md):
    # each expert = base + (lora_alpha / lora_rank) * A @ B.
    kind: str = "base"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    freeze_base: bool = True  # pikv: base weights get no gradient and no optimizer state
    share_base: bool = False  # pikv: one dense FFN is every expert's base (replicated under EP)


@dataclass
class DataConfig:
    # 'embedded' | a prepared directory (train/prepare_data.py) | a .txt/.jsonl/.jsonl.gz/.parquet
    # file, save_to_disk folder, directory or glob of these | a hub dataset name (docs/data.md)
    source: str = "embedded"
    text_field: str = "text"  # field/column holding the text for JSONL / Parquet / Arrow / hub data
    # 'bpe' = train a byte-level BPE on the train split; else a tokenizer.json, a model folder, a
    # .gguf model file or a hub name
    tokenizer: str = "bpe"
    seq_len: int = 256
    validation_docs: int = 2  # documents (plays) held out for periodic validation
    heldout_docs: int = 4  # documents never seen in training, for the final evaluation
    split_seed: int = 1234  # the split is a function of this seed and the document names only
    # With fewer than validation_docs + heldout_docs + 1 documents (or either set to 0) the split is
    # by contiguous ranges instead: these fractions of the text's bytes at the end of the corpus.
    validation_fraction: float = 0.05
    heldout_fraction: float = 0.05
    errors: str = "strict"  # bytes that are not UTF-8: 'strict' (an error naming the offset) | 'replace'
    cache_dir: str = ""  # '' = $PIKV_CACHE or ~/.cache/pikv
    # Fraction of training samples turned into passkey-retrieval probes (pikv/data/probe.py); the
    # KV evaluation's retrieval probe needs a model trained on it. 0 = none. Off by default: the
    # default 450-step model does not learn in-context copying at all (docs/kv.md, "Retrieval probe").
    probe_rate: float = 0.0


@dataclass
class LRGroup:
    params: str = MISSING  # a glob on parameter names (fnmatch: `*` crosses dots)
    lr: float = MISSING


@dataclass
class TrainConfig:
    run_name: str = "tiny"
    output_dir: str = "runs"  # the run directory is <output_dir>/<run_name>/
    seed: int = 0
    max_steps: int = 450
    batch_size: int = 16  # sequences per micro-batch per data-parallel rank
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 150
    eval_batches: int = 8
    checkpoint_every: int = 150
    keep_checkpoints: int = 2
    resume: str = "auto"  # 'auto' | 'never' | path to a checkpoint directory
    # Stop after this step with a checkpoint, as if preempted (Megatron's exit_interval): a later
    # run with resume=auto continues. The schedule still follows max_steps.
    exit_at_step: Optional[int] = None
    engine: str = "torch"  # 'torch' (own reducer + AdamW) | 'deepspeed' (deepspeed.initialize, ZeRO)
    zero_stage: int = 0  # engine=deepspeed: ZeRO stage 0, 1, 2 (3 only without expert parallelism)
    # engine=deepspeed: a DeepSpeed JSON for everything PiKV does not set itself (bucket sizes,
    # overlap_comm, ...). Keys PiKV sets from this config must agree with it (see docs/architecture.md).
    deepspeed_config: Optional[str] = None
    # A step whose loss is NaN/inf on any rank is skipped (no update); more than this many skipped
    # steps in one process stops the run with an error naming the step and the last checkpoint.
    max_nonfinite_steps: int = 3
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    # 'auto' (bf16 autocast on CUDA, fp32 on CPU) | 'fp32' | 'bf16' | 'fp16' (engine=deepspeed on CUDA)
    dtype: str = "auto"
    mode: str = "lm"  # 'lm' (next-token loss) | 'distill' (plus KD from distill.teacher, see DistillConfig)
    # Upcycling (pikv/training/upcycle.py): initialise a fresh run from this checkpoint (a dense
    # teacher: its FFN becomes every expert's base; or a MoE). '' = random init. Ignored on resume.
    init_from: str = ""
    # Recompute each transformer block's activations in backward instead of storing them
    # (pikv/models/parallelize.py): 'none' | 'full' (every block) | 'selective' (matmul and
    # attention outputs are kept, the cheap elementwise ops recomputed).
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile each transformer block (pikv/models/parallelize.py)
    # Parameters kept frozen (no gradient, no optimizer state): glob patterns on parameter names, e.g.
    # ['embed_tokens.*'] (a tied LM head is the same tensor) or ['layers.*.mlp.*']. Each pattern must
    # match some parameter (pikv/models/freeze.py). The retrofit recipe freezes the embeddings.
    freeze: list[str] = field(default_factory=list)
    # Per-group learning rates: [{params: GLOB, lr: LR}, ...]; a trainable parameter takes the lr of the
    # first glob its name matches, else train.lr; every group follows the same warmup/cosine shape
    # scaled by lr / train.lr (pikv/training/optim.py). A glob matching no trainable parameter is an error.
    param_groups: list[LRGroup] = field(default_factory=list)


@dataclass
class DistillConfig:
    # train.mode=distill: loss = (1 - weight) * LM + weight * T^2 * KL(teacher_T || student_T)
    # + hidden_weight * MSE of the hidden states after `hidden_layers` + router losses (Hinton et
    # al. 2015; the T^2 keeps the soft-target gradients on the LM loss's scale).
    # a PiKV checkpoint (step_<N> or run directory) with the same tokenizer, or a pretrained HF model
    # (what model.init_from_hf takes: the original model of a retrofit keeps its full-cache quality)
    teacher: str = ""
    weight: float = 0.5
    temperature: float = 2.0
    hidden_layers: list[int] = field(default_factory=list)  # block indices (teacher and student alike)
    hidden_weight: float = 1.0


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    backend: str = "auto"  # 'auto' (nccl on CUDA, gloo on CPU) | 'gloo' | 'nccl'


@dataclass
class LoggingConfig:
    log_every: int = 1  # per-step router metrics; each logged step syncs the host once
    wandb_mode: str = "offline"  # 'online' | 'offline' | 'disabled'
    wandb_project: str = "pikv"
    wandb_entity: Optional[str] = None
    wandb_tags: list[str] = field(default_factory=list)
    progress: bool = True  # rank-0 progress bar


@dataclass
class KVConfig:
    # The jointly trained KV compressor (pikv/kv/learned.py): 'learned' = a nested low-rank latent
    # of each layer's keys+values, trained at the ranks of `train_ratios`; 'none' = a plain model;
    # 'auto' (default) = 'learned' for task=lm, 'none' for the other tasks. See docs/kv.md.
    compressor: str = "auto"
    train_ratios: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    full_every: int = 3  # co-training: one full-cache step per this many compressed steps (0 = never)
    # Fraction of train.max_steps after which the LM runs through the latent (co-training, the
    # train_ratios cycle with full_every); before it the LM uses the full cache and the compressor
    # trains on the side alone (its attention error, no gradient to the model). 1.0 = side training
    # only (pikv/kv/learned.py TrainSchedule).
    cotrain_start: float = 0.8
    # Weight of the compressor's loss: per layer, the relative error of the attention output through
    # the latent vs through the full cache (pikv/kv/learned.py attention_error; metric kv_attn_error).
    attn_error_weight: float = 0.1
    # A fresh run's compressor starts from the principal directions of the model's own pre-RoPE keys
    # and values on this many training windows (pikv/kv/fit.py pca_init_; the retrofit recipe, where
    # the model is pretrained); 0 = random init (a model trained from scratch has no keys to fit yet).
    pca_init_windows: int = 0
    # Storage of the latent codes: 8 = int8 with one fp16 scale per token and layer (Palu-style
    # quantized latent: at equal bytes about twice the rank of fp16), trained with the same
    # quantization in the loop; 16 = fp16 codes. The rank of a ratio fills its byte budget.
    latent_bits: int = 8
    # Recent tokens kept exact (fp16) beside the latent: a query reads its last `latent_window`
    # keys/values exactly and older ones through the latent, whose rank gets the bytes the window
    # leaves for a data.seq_len-token sequence (pikv/kv/learned.py latent_rank). 0 = latent only;
    # null (default) = 8, or fewer where 8 would take more than half of the smallest budget
    # (short sequences), filled in by `resolve` so config.yaml and checkpoints record the number.
    latent_window: Optional[int] = None
    # The KV table of the default held-out evaluation (train/eval.py without --kv).
    eval_policies: list[str] = field(default_factory=lambda: [
        "learned", "window", "streaming", "h2o", "snapkv", "pyramid", "lru", "quest", "quant", "svd"])
    eval_ratio: float = 4.0


@dataclass
class FlexConfig:
    # task=flex: Flex-MoE (pikv/models/flex_moe.py, docs/variants.md) on the diabetes study's three
    # measurement sources. Which modalities training samples lack: 'random' (each one absent with
    # probability missing_rate, at least one kept), 'structured' (whole groups of patients lack
    # the same sources, see pikv/data/multimodal.py) or 'none'.
    missing: str = "random"
    missing_rate: float = 0.5
    bank: bool = True  # the missing-modality bank; false = zero-filled inputs (the ablation)
    specialized_routing: bool = True  # S-Router: top-1 expert = the sample's modality combination
    heldout_fraction: float = 0.2  # patients for the final per-combination test
    validation_fraction: float = 0.15


@dataclass
class TimeConfig:
    # task=time: Time-MoE (pikv/models/time_moe.py, docs/variants.md) on statsmodels' series.
    context_len: int = 64  # input points per training window (<= model.max_seq_len)
    # Multi-resolution forecast heads (the paper: 1, 8, 32, 64) and the evaluated horizons: 2 / 4
    # years of monthly, 6 / 12 of quarterly data.
    heads: list[int] = field(default_factory=lambda: [1, 8, 24, 48])
    eval_horizons: list[int] = field(default_factory=lambda: [24, 48])
    huber_delta: float = 2.0  # Time-MoE's Huber loss delta
    train_fraction: float = 0.8  # of each training series; later windows are the validation split


@dataclass
class JobConfig:
    task: str = "lm"  # 'lm' | 'flex' | 'time' (pikv/tasks)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    flex: FlexConfig = field(default_factory=FlexConfig)
    time: TimeConfig = field(default_factory=TimeConfig)


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

# Keys renamed so that one word means one thing (docs/architecture.md, "Names"). A YAML file or an
# override that uses the old key is an error naming the new one; a config stored in a checkpoint
# written before the rename is migrated (it must stay loadable for eval and export).
RENAMED = {"kv.distill_weight": "kv.attn_error_weight"}


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


def _schema_error(err: OmegaConfBaseException, where: str) -> ValueError:
    key = getattr(err, "full_key", None) or "?"
    msg = getattr(err, "msg", str(err)).splitlines()[0]
    return ValueError(f"{where}: config key '{key}': {msg}")


def _check_renamed(keys: list[str], where: str) -> None:
    for key in keys:
        if key in RENAMED:
            raise ValueError(f"{where}: config key '{key}' was renamed to '{RENAMED[key]}'")


def _dotted_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return []
    return [k for name, v in data.items() for k in [prefix + str(name)] + _dotted_keys(v, f"{prefix}{name}.")]


def merge_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                 base: Optional[dict] = None) -> JobConfig:
    """Defaults <- `base` (a nested dict: the values of a pretrained model, pikv.tasks.pretrained) <-
    YAML file <- dotlist overrides, schema-checked (unknown keys, types) only."""
    merged = OmegaConf.structured(JobConfig)
    if base:
        merged = OmegaConf.merge(merged, OmegaConf.create(base))
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--config {path!r}: no such file")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:  # one line naming the file and the place, not a parser traceback
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path}: malformed YAML{where}: {problem}") from None
        _check_renamed(_dotted_keys(OmegaConf.to_container(loaded)), f"config file {path}")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"config file {path}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        _check_renamed([item.split("=", 1)[0].strip()], f"override {item!r}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"override {item!r}") from None
    return OmegaConf.to_object(merged)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> JobConfig:
    """Defaults <- YAML file <- dotlist overrides, resolved and validated (the checks that need no
    builder; an entry point runs pikv.tasks.load_job, which adds the builders' checks)."""
    return validate(resolve(merge_config(path, overrides)))


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> JobConfig:
    """Rebuild a config stored in a checkpoint or run directory (same validation as load); keys
    renamed since it was written (RENAMED) are migrated."""
    data = {section: dict(v) if isinstance(v, dict) else v for section, v in data.items()}
    for old, new in RENAMED.items():
        (s_old, n_old), (s_new, n_new) = old.split("."), new.split(".")
        if n_old in data.get(s_old, {}):
            data[s_new][n_new] = data[s_old].pop(n_old)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise _schema_error(err, "stored config") from None
    return validate(resolve(OmegaConf.to_object(merged)))


def save_yaml(cfg: JobConfig, path: Path) -> None:
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
