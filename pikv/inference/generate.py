"""Text generation from a checkpoint on one or many processes: prompts -> tokens, timings, KV bytes.

Shapes: B batch, T prompt tokens, V vocab.

Every rank runs the same prompts in the same order (the replicated-token layout that expert
parallelism at decode and the sharded KV cache both assume): the MoE layers exchange token-slots
with the experts' owners through the all-to-all, and the token chosen at each step is broadcast
from rank 0, so all ranks feed the same tokens even where their logits differ by an ulp.

Batching groups prompts by token length (no padding, so no attention mask is needed and a batched
prompt gets exactly the tokens it gets alone, for every KV method); a batch holds up to
`batch_size` prompts of one length, in the order they first appear. Sampling is per prompt: prompt
i draws from its own generator seeded by (seed, i), so its tokens do not depend on the batch size
or on the other prompts.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from pikv.data import Document, pack_documents, prepare_data
from pikv.distributed import DistContext
from pikv.eval.kv import heldout_sequences
from pikv.kv import make_cache, parse_method, resolve_policy
from pikv.kv.fit import calibrate_svd
from pikv.models.generation import check_sampling, decode_tokens, sample_next


KV_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerateOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: Optional[int] = None
    seed: int = 0
    kv: str = "full"  # any method name of pikv.kv.registry (single or STORAGE[@SHARE]+SELECTION)
    ratio: Optional[float] = None  # compression ratio vs an fp16 full cache; needed unless kv is full
    batch_size: int = 1
    # The cache's storage dtype: "auto" keeps the model's (exact: what Transformer.generate's plain
    # cache does); float16 / bfloat16 halve an fp32 model's cache. Budgets (ratio) are against
    # fp16 whatever it is (pikv/kv/registry.py).
    kv_dtype: str = "auto"

    def check(self) -> "GenerateOptions":
        """ValueError naming the bad option; the kv name becomes canonical. Returns self."""
        check_sampling(self.max_new_tokens, self.temperature, self.top_k)
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be >= 1")
        self.kv = resolve_policy(self.kv)
        if self.kv != "full" and self.ratio is None:
            raise ValueError(f"--kv {self.kv} compresses the cache: give --ratio R (fp16 full bytes / kept bytes, "
                             "R >= 1); only --kv full needs none")
        if self.kv == "full" and self.ratio is not None:
            raise ValueError(f"--ratio {self.ratio} with --kv full: the full cache keeps everything; "
                             "drop --ratio or name a compressing method (--kv h2o, quant, quant+h2o, ...)")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"--kv-dtype {self.kv_dtype!r}: allowed are {', '.join(KV_DTYPES)}")
        if self.ratio is not None and not self.ratio >= 1:
            raise ValueError(f"--ratio {self.ratio} must be >= 1 (fp16 full bytes / kept bytes)")
        return self


@dataclass
class GenerateReport:
    prompts: list[str]
    text: list[str]  # the generated continuation of each prompt
    prompt_token_ids: list[list[int]]
    token_ids: list[list[int]]  # the generated tokens of each prompt
    tokens_per_s: Optional[float]  # generated tokens after each batch's first / decode seconds
    time_to_first_token_s: float  # mean over batches: prefill + the first token
    kv_bytes_per_rank: list[int]  # KVCache.nbytes() at the end of the largest batch, per rank
    kv_peak_bytes_per_rank: list[int]
    param_bytes_per_rank: list[int]
    expert_params_per_rank: list[int]
    world_size: int
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompts(prompt: Optional[str], prompts_file: Optional[Path]) -> list[str]:
    """The prompts of --prompt TEXT or --prompts FILE: a .jsonl file holds one JSON object with a
    "prompt" field per line; any other file one prompt per non-empty line."""
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT and --prompts FILE")
    if prompt is not None:
        if not prompt:
            raise ValueError("--prompt is empty: give some text to continue")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        prompts = [line for _, line in lines]
    else:
        prompts = []
        for i, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--prompts {path} line {i}: not JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"--prompts {path} line {i}: expected an object with a string \"prompt\" field")
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


def encode_prompts(tokenizer, prompts: list[str], max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    """Token ids of each prompt as a document starts in training ([EOT] + text, pack_documents);
    ValueError naming the lengths when a prompt and its new tokens exceed max_seq_len."""
    out = []
    for i, text in enumerate(prompts):
        ids = [int(t) for t in pack_documents(tokenizer, [Document(f"prompt {i}", text)])]
        if len(ids) + max_new_tokens > max_seq_len:
            raise ValueError(f"prompt {i} is {len(ids)} tokens (with the leading end-of-text token); with "
                             f"--max-new-tokens {max_new_tokens} that makes {len(ids) + max_new_tokens}, more than "
                             f"the model's max_seq_len {max_seq_len}")
        out.append(ids)
    return out


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by equal length, at most batch_size each, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


def kv_shard_group(ctx: DistContext) -> Optional[dist.ProcessGroup]:
    """The group the KV cache is sharded over (pikv.kv.make_cache(..., shard_group=)): every rank
    of a multi-process run holds a share of every layer's tokens (docs/kv.md, "Sharded across ranks")."""
    return dist.group.WORLD if ctx.world_size > 1 else None


def build_cache(opts: GenerateOptions, model, total_tokens: int, svd_bases, ctx: DistContext):
    """The KV cache of one batch: opts.kv at opts.ratio, sharded over kv_shard_group(ctx) if any."""
    group = kv_shard_group(ctx)
    sharding = {} if group is None else {"shard_group": group}
    ratio = None if opts.kv == "full" else opts.ratio
    return make_cache(opts.kv, model, ratio=ratio, total_tokens=total_tokens, store_dtype=KV_DTYPES[opts.kv_dtype],
                      svd_bases=svd_bases, **sharding)


def svd_calibration(model, tokenizer, cfg, ctx: DistContext):
    """The svd storage's bases, as train/eval.py calibrates them: 8 windows of the run's training
    documents (every rank computes them, the same, as the model's forward needs every rank)."""
    prepared = prepare_data(cfg, None, ctx.is_main, ctx.barrier).prepared
    docs = prepared.documents("train", limit=2)
    return calibrate_svd(model, heldout_sequences(tokenizer, docs, cfg.data.seq_len, 8))


class TokenPicker:
    """Greedy or per-prompt seeded sampling; the pick is broadcast from rank 0 when world > 1."""

    def __init__(self, opts: GenerateOptions, prompt_ids: list[int], device: torch.device, world_size: int):
        self.opts, self.world_size = opts, world_size
        self.generators = [torch.Generator(device).manual_seed(int(np.random.SeedSequence([opts.seed, i])
                                                                   .generate_state(1)[0])) for i in prompt_ids]

    def __call__(self, logits_BV: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.temperature == 0.0:
            next_B1 = sample_next(logits_BV)
        else:
            next_B1 = torch.cat([sample_next(logits_BV[b:b + 1], o.temperature, o.top_k, g)
                                 for b, g in enumerate(self.generators)])
        if self.world_size > 1:
            dist.broadcast(next_B1, src=0)
        return next_B1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_batch(model, prompt_BT: torch.Tensor, picker: TokenPicker, cache,
               max_new: int) -> tuple[torch.Tensor, float, float]:
    """(generated tokens [B, max_new], seconds to the first token, seconds for the rest)."""
    _sync(prompt_BT.device)
    t0 = time.perf_counter()
    steps = decode_tokens(model, prompt_BT, max_new, cache, picker)
    out = [next(steps)]
    _sync(prompt_BT.device)
    t1 = time.perf_counter()
    out += list(steps)
    _sync(prompt_BT.device)
    return torch.cat(out, dim=1), t1 - t0, time.perf_counter() - t1


def _gather(value: int, world_size: int) -> list[int]:
    if world_size == 1:
        return [value]
    values: list = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def generate_texts(model, tokenizer, prompts: list[str], prompt_ids: list[list[int]], opts: GenerateOptions,
                   ctx: DistContext, svd_bases=None) -> GenerateReport:
    """Generate opts.max_new_tokens after every prompt (batched by length); every rank calls it with
    the same arguments and gets the same report."""
    texts, new_ids = [None] * len(prompts), [None] * len(prompts)
    first_s, decode_s, kv, kv_peak = [], 0.0, 0, 0
    batches = length_batches([len(p) for p in prompt_ids], opts.batch_size)
    for idx in batches:
        prompt_BT = torch.tensor([prompt_ids[i] for i in idx], dtype=torch.long, device=ctx.device)
        cache = build_cache(opts, model, prompt_BT.shape[1] + opts.max_new_tokens, svd_bases, ctx)
        picker = TokenPicker(opts, idx, ctx.device, ctx.world_size)
        tokens_BN, ttft, rest = _run_batch(model, prompt_BT, picker, cache, opts.max_new_tokens)
        first_s.append(ttft)
        decode_s += rest
        kv, kv_peak = max(kv, cache.nbytes()), max(kv_peak, cache.peak_nbytes)
        for b, i in enumerate(idx):
            new_ids[i] = tokens_BN[b].tolist()
            texts[i] = tokenizer.decode(new_ids[i])
    after_first = len(prompts) * (opts.max_new_tokens - 1)
    expert_params = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    return GenerateReport(
        prompts=prompts, text=texts, prompt_token_ids=prompt_ids, token_ids=new_ids,
        tokens_per_s=after_first / decode_s if after_first and decode_s > 0 else None,
        time_to_first_token_s=sum(first_s) / len(first_s),
        kv_bytes_per_rank=_gather(kv, ctx.world_size), kv_peak_bytes_per_rank=_gather(kv_peak, ctx.world_size),
        param_bytes_per_rank=_gather(sum(p.numel() * p.element_size() for p in model.parameters()), ctx.world_size),
        expert_params_per_rank=_gather(expert_params, ctx.world_size), world_size=ctx.world_size,
        options=asdict(opts))


def needs_svd(opts: GenerateOptions) -> bool:
    return parse_method(opts.kv).storage == "svd"


def format_report(report: GenerateReport) -> str:
    """What rank 0 prints: each prompt and its continuation, then the speed and memory lines."""
    lines = []
    for i, (prompt, text) in enumerate(zip(report.prompts, report.text)):
        lines += [f"--- prompt {i} ---", prompt + text]
    tps = "n/a (one new token)" if report.tokens_per_s is None else f"{report.tokens_per_s:.1f}"
    lines += ["---", f"tokens/s (decode, after the first token): {tps}",
              f"time to first token: {report.time_to_first_token_s * 1000:.1f} ms (mean over batches)",
              f"KV bytes per rank: {report.kv_bytes_per_rank} (peak {report.kv_peak_bytes_per_rank})",
              f"parameter bytes per rank: {report.param_bytes_per_rank} "
              f"(expert parameters per rank: {report.expert_params_per_rank})"]
    return "\n".join(lines)
