"""The job configuration's schema: one dataclass per section, with its defaults (the tiny CPU model).
OmegaConf structured configs over these reject an unknown key or a wrong type by the schema itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


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
    # (GPT-NeoX rotary_pct, HF partial_rotary_factor); 1.0 = every dim (Llama; a model started from
    # HF takes its value). 0.5 lets the learned KV latent decode in the compressed domain (MLA's
    # decoupled RoPE key, pikv/kv/mla.py): faster than the full cache from 8k tokens, for +1.1%
    # held-out bits/byte on the default job (docs/benchmarks.md, "Partial rotary as the default").
    rotary_fraction: float = 0.5
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
    # The default model's 16 rotated key dims per head take 34 bytes per token of an 8x budget's 32,
    # so the latent alone reaches ~4x there; 8x and 16x are compositions (learned@4+h2o).
    train_ratios: list[float] = field(default_factory=lambda: [2.0, 4.0])
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
    # quantization in the loop; 4 = int4 with one fp16 scale per 32 consecutive latent coordinates
    # (pikv/kv/latent_codes.py; at 8x ~1.8x the rank of int8); 16 = fp16 codes. The rank of a
    # ratio fills its byte budget. An evaluation may store another width: `--kv learned:b4`.
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
