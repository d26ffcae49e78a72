"""Held-out decoding evaluation of KV-cache policies: true sequential decoding, budget at every step.

Shapes: X sequences, B batch, N sequence length, P prefill (context) tokens, C = N - P scored
continuation tokens, V vocab.

Each sequence is a window of a held-out document. The model prefills the first P tokens into a
cache of the policy under test, then decodes the continuation one token at a time (teacher
forcing: the true next token is fed), the cache enforcing its budget after every step. Scored:
the C continuation tokens (the first one is predicted by the prefill's last position). The
reference is the same model with the full fp16 cache. No masked single-pass simulation is used:
every number comes from the decoding loop itself.

Per method and budget: NLL and perplexity; change vs full with a bootstrap 95% interval over
sequences; KL(full || method) per token; top-1 agreement with full; measured compression ratio
= peak resident bytes of the full fp16 cache / peak resident bytes of the method's cache (both
`KVCache.nbytes()`: allocated bytes, metadata included); Quest's read ratio (bytes of K/V read per decode
step, full / Quest); decode tokens/s; peak KV bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pikv.eval import probe as probe_eval
from pikv.eval.budget_match import match_budget
from pikv.eval.decode import decode_logprobs
from pikv.eval.pareto import PARETO_METHODS, pareto_markdown, pareto_summary, plot
from pikv.eval.stats import bootstrap_ci
from pikv.kv.fit import calibrate_svd
from pikv.kv import make_cache, parse_method, resolve_policy


@dataclass
class KVEvalRow:
    policy: str
    ratio: Optional[float]  # requested (the target, with match_bytes)
    compression_ratio: Optional[float] = None  # measured from bytes
    nll: Optional[float] = None
    perplexity: Optional[float] = None
    delta_nll: Optional[float] = None
    delta_nll_ci95: Optional[list[float]] = None
    ppl_change_pct: Optional[float] = None
    kl: Optional[float] = None
    top1_agreement: Optional[float] = None
    tokens_per_s: Optional[float] = None
    kv_peak_bytes: Optional[int] = None
    read_ratio: Optional[float] = None  # Quest: full bytes read per step / bytes read
    probe_accuracy: Optional[float] = None  # retrieval probe (pikv/eval/probe.py): passkey recall
    probe_by_depth: Optional[dict[str, float]] = None  # needle depth -> accuracy
    sequences: int = 0
    scored_tokens: int = 0
    skipped: Optional[str] = None  # why this budget is impossible for this method
    nll_per_sequence: Optional[list[float]] = None  # mean NLL of each sequence (paired comparisons)
    budget_ratio: Optional[float] = None  # the ratio given to make_cache when raised to meet `ratio` in bytes


def heldout_sequences(tokenizer, docs, length: int, max_sequences: int) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens inside single documents, spread evenly over the
    documents (round robin), at most max_sequences: LongTensor [X, length]."""
    from pikv.data import pack_documents
    parts = [pack_documents(tokenizer, [d])[1:] for d in docs]  # drop the leading EOT
    bounds, pos = [], 0
    for part in parts:
        bounds.append((pos, pos + len(part)))
        pos += len(part)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    per_doc = [[s + i * length for i in range((e - s) // length)] for s, e in bounds]
    starts: list[int] = []
    for i in range(max(map(len, per_doc), default=0)):
        for d in per_doc:
            if i < len(d):
                starts.append(d[i])
    if not starts:
        raise ValueError(f"no document holds {length} tokens: nothing to evaluate")
    pick = np.linspace(0, len(starts) - 1, min(max_sequences, len(starts))).round().astype(int)
    return torch.from_numpy(np.stack([tokens[starts[i]:starts[i] + length] for i in pick]).astype(np.int64))


def windows_digest(seq_XN: torch.Tensor) -> str:
    """sha256 of the windows' token ids (int64): two results files scored the same tokens iff equal."""
    return hashlib.sha256(seq_XN.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _full_read_bytes(cfg, B: int, prefill: int, C: int) -> int:
    """Bytes a full fp16 cache reads over the C - 1 decode steps (all stored K/V of every layer)."""
    G, D, L = cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads, cfg.num_layers
    return sum(L * B * G * (prefill + i + 1) * 2 * D * 2 for i in range(C - 1))


def _score_batch(model, seq_BN: torch.Tensor, prefill: int, rows: dict, acc: dict, svd_bases) -> tuple[int, int]:
    """Decode one batch with the full cache and with every spec's cache; add each spec's NLL, KL,
    top-1 agreement, time, peak and read bytes to `acc`. Returns the full cache's (peak, read) bytes."""
    B, N = seq_BN.shape
    full_cache = make_cache("full", model, total_tokens=N)
    ref, ref_secs = decode_logprobs(model, seq_BN, prefill, full_cache)
    tgt, ref_top1 = seq_BN[:, prefill:], ref.argmax(-1)
    for spec, row in rows.items():
        if row.skipped:
            continue
        lp, cache, secs = ref, full_cache, ref_secs
        if spec != ("full", 1.0):
            try:
                cache = make_cache(spec[0], model, ratio=row.budget_ratio or spec[1], total_tokens=N,
                                   svd_bases=svd_bases)
            except ValueError as err:
                row.skipped = str(err)
                continue
            lp, secs = decode_logprobs(model, seq_BN, prefill, cache)
        a = acc[spec]
        a["nll"].append((-lp.gather(-1, tgt[..., None])[..., 0]).sum(1).double().numpy())
        a["kl"] += float((ref.exp() * (ref - lp)).sum(-1).sum())
        a["agree"] += float((lp.argmax(-1) == ref_top1).float().sum())
        a["time"] += secs
        a["peak"] += cache.peak_nbytes
        a["read"] += cache.bytes_read
    return full_cache.peak_nbytes, _full_read_bytes(model.cfg, B, prefill, N - prefill)


def finish_row(row: KVEvalRow, a: dict, full_nll_X: np.ndarray, full_peak: int, full_read: int,
                X: int, C: int, batches: int) -> None:
    """Fill `row` from its accumulators `a` (per-sequence NLL sums, KL / top-1 / seconds / peak and
    read bytes summed over batches) against the full cache's per-sequence NLL, peak and read bytes."""
    nll_X = np.concatenate(a["nll"]) / C
    row.nll = float(nll_X.mean())
    row.perplexity = math.exp(row.nll)
    row.delta_nll = float((nll_X - full_nll_X).mean())
    row.delta_nll_ci95 = bootstrap_ci(nll_X - full_nll_X)
    row.ppl_change_pct = 100.0 * (math.exp(row.delta_nll) - 1)
    row.kl = a["kl"] / (X * C)
    row.top1_agreement = a["agree"] / (X * C)
    row.tokens_per_s = X * (C - 1) / a["time"] if a["time"] > 0 else None
    row.kv_peak_bytes = int(a["peak"] / batches)
    row.compression_ratio = full_peak / a["peak"]
    if a["read"] and parse_method(row.policy).selection == "quest":
        row.read_ratio = full_read / a["read"]
    row.sequences, row.scored_tokens = X, X * C
    row.nll_per_sequence = [float(x) for x in nll_X]


@torch.no_grad()
def evaluate_kv(model, seq_XN: torch.Tensor, prefill: int, specs: list[tuple[str, Optional[float]]],
                batch_size: int = 16, svd_bases=None, progress=None, match_bytes: bool = False) -> list[KVEvalRow]:
    """Evaluate each (policy, ratio) of `specs` against the full fp16 cache on the same sequences.
    match_bytes: give each method the mildest budget whose measured ratio reaches `ratio`
    (pikv/eval/budget_match.py), so methods compare at equal measured bytes."""
    model.eval()
    X, N = seq_XN.shape
    if not 0 < prefill < N - 1:
        raise ValueError(f"prefill={prefill} must be in [1, {N - 2}] for sequences of {N} tokens")
    specs = [(resolve_policy(p), r) for p, r in specs]
    specs = [s for s in specs if s[0] != "full"]  # the full cache is always the reference row
    rows = {spec: KVEvalRow(spec[0], spec[1]) for spec in [("full", 1.0)] + specs}
    if match_bytes:
        _match_budgets(model, rows, N, prefill, svd_bases)
    acc = {spec: {"nll": [], "kl": 0.0, "agree": 0.0, "time": 0.0, "peak": 0, "read": 0} for spec in rows}
    full_peak, full_read = 0, 0
    batches = -(-X // batch_size)
    for b in range(batches):
        peak, read = _score_batch(model, seq_XN[b * batch_size:(b + 1) * batch_size], prefill, rows, acc, svd_bases)
        full_peak, full_read = full_peak + peak, full_read + read
        if progress:
            progress(f"batch {b + 1}/{batches}")
    full_nll_X = np.concatenate(acc[("full", 1.0)]["nll"]) / (N - prefill)
    for spec, row in rows.items():
        if not row.skipped:
            finish_row(row, acc[spec], full_nll_X, full_peak, full_read, X, N - prefill, batches)
    return list(rows.values())


def _match_budgets(model, rows: dict, N: int, prefill: int, svd_bases) -> None:
    for (policy, ratio), row in rows.items():
        if policy != "full" and ratio is not None:
            try:
                budget, _ = match_budget(model, policy, ratio, N, prefill, svd_bases)
            except ValueError as err:
                row.skipped = str(err)
                continue
            row.budget_ratio = budget if budget != ratio else None


def paired_comparisons(rows: list[KVEvalRow], method: str = "learned") -> list[dict]:
    """`method` minus every other policy at the same requested ratio, paired per sequence:
    mean ΔNLL and its bootstrap 95% interval (negative = `method` is better)."""
    ok = [r for r in rows if not r.skipped and r.nll_per_sequence]
    out = []
    for mine in (r for r in ok if r.policy == method):
        for other in (r for r in ok if r.policy not in (method, "full") and r.ratio == mine.ratio):
            d = np.array(mine.nll_per_sequence) - np.array(other.nll_per_sequence)
            out.append({"ratio": mine.ratio, "other": other.policy, "other_compression_ratio": other.compression_ratio,
                        "delta_nll": float(d.mean()), "ci95": bootstrap_ci(d)})
    return out


def markdown_table(rows: list[KVEvalRow]) -> str:
    lines = ["| policy | ratio (requested) | compression (measured) | NLL | perplexity | ΔNLL [95% CI] | Δppl % "
             "| KL to full | top-1 agree | probe acc | decode tok/s | KV peak bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.policy} | {r.ratio:g} | — | skipped: {r.skipped} | | | | | | | | |")
            continue
        probe = "—" if r.probe_accuracy is None else f"{r.probe_accuracy:.3f}"
        comp = f"{r.compression_ratio:.2f}x" + (f" (reads {r.read_ratio:.2f}x less)" if r.read_ratio else "")
        asked = f"{r.ratio:g}" + (f" (given {r.budget_ratio:.2f})" if r.budget_ratio else "")
        lines.append(f"| {r.policy} | {asked} | {comp} | {r.nll:.4f} | {r.perplexity:.2f} | "
                     f"{r.delta_nll:+.4f} [{r.delta_nll_ci95[0]:+.4f}, {r.delta_nll_ci95[1]:+.4f}] | "
                     f"{r.ppl_change_pct:+.2f} | {r.kl:.4f} | {r.top1_agreement:.3f} | {probe} | {r.tokens_per_s:.0f} | "
                     f"{r.kv_peak_bytes} |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[KVEvalRow], out: Path, meta: dict, probe_md: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    pairs = paired_comparisons(rows)
    summary = pareto_summary(rows)
    (out / "results.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows],
                                                  "learned_vs": pairs, "pareto": summary}, indent=1))
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    text = f"# KV-cache held-out decoding evaluation\n\n{head}\n\n" + markdown_table(rows)
    if pairs:
        text += ("\n## learned minus each training-free policy (same requested ratio, paired per sequence)\n\n"
                 "| ratio | other | other's measured ratio | ΔNLL [95% CI] |\n|---|---|---|---|\n")
        text += "".join(f"| {p['ratio']:g} | {p['other']} | {p['other_compression_ratio']:.2f}x | "
                        f"{p['delta_nll']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] |\n" for p in pairs)
    text += "\n" + pareto_markdown(rows, summary)
    if probe_md:
        text += "\n## Retrieval probe: passkey accuracy by needle depth\n\n" + probe_md
    (out / "results.md").write_text(text)
    plot(rows, out / "results.png")


def expand_methods(policies: str) -> list[str]:
    """'h2o,pareto' -> canonical names, `pareto` standing for PARETO_METHODS (pikv/eval/pareto.py),
    each name once, in order."""
    names = []
    for p in (p.strip() for p in policies.split(",") if p.strip()):
        names += list(PARETO_METHODS) if p.lower() == "pareto" else [resolve_policy(p)]
    return list(dict.fromkeys(names))


def merge_results(dirs: list[Path]) -> tuple[list[KVEvalRow], dict]:
    """Rows and meta of several runs' results.json on the same windows (e.g. one run per ratio, run
    side by side), one full-cache row; ValueError when their full caches' NLLs differ (other windows)."""
    rows: list[KVEvalRow] = []
    meta: dict = {}
    names = {f.name for f in fields(KVEvalRow)}
    for d in dirs:
        report = json.loads((Path(d) / "results.json").read_text())
        got = [KVEvalRow(**{k: v for k, v in r.items() if k in names}) for r in report["rows"]]
        full = next(r for r in got if r.policy == "full")
        if rows and full.nll_per_sequence != rows[0].nll_per_sequence:
            raise ValueError(f"{d}: its full cache's per-window NLL differs from {dirs[0]}'s: not the same windows")
        rows += [r for r in got if not (rows and r.policy == "full")]
        meta.update({k: v for k, v in report.items() if k not in ("rows", "learned_vs", "pareto")})
    meta["merged_from"] = [str(d) for d in dirs]
    return rows, meta


def parse_specs(policies: str, ratios: str) -> list[tuple[str, float]]:
    """'h2o,learned,quant+snapkv' x '2,4,8' -> [(canonical method name, ratio)] (names: pikv.kv.registry,
    STORAGE[@SHARE]+SELECTION or a single name, or `pareto`); ValueError on a bad name or ratio."""
    names = expand_methods(policies)
    try:
        rs = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"--ratio {ratios!r} must be a comma-separated list of numbers >= 1") from None
    if not rs or any(not r >= 1 for r in rs):
        raise ValueError(f"--ratio {ratios!r}: every compression ratio must be >= 1")
    return [(p, r) for p in names for r in rs]


def run_kv_evaluation(model, tokenizer, docs, calib_docs, specs, out: Path, length: int, prefill: int,
                      max_sequences: int, batch_size: int, meta: dict, probe=None,
                      probe_fillers: int = 16, match_bytes: bool = False) -> list[KVEvalRow]:
    """Held-out decoding evaluation end to end: sequences, SVD calibration (on `calib_docs`, never
    the evaluated ones), rows, the retrieval probe when `probe` (a PasskeyProbe: the model was
    trained on it) is given, results.json / results.md / results.png under `out`."""
    seq = heldout_sequences(tokenizer, docs, length, max_sequences)
    bases = None
    if any(parse_method(p).storage == "svd" for p, _ in specs):
        bases = calibrate_svd(model, heldout_sequences(tokenizer, calib_docs, length, 8))
    t0 = time.perf_counter()
    rows = evaluate_kv(model, seq, prefill, specs, batch_size, svd_bases=bases, match_bytes=match_bytes)
    meta = {**meta, "budgets": "matched to the target's measured bytes" if match_bytes else "as requested",
            "windows_sha256": windows_digest(seq), "sequences": int(seq.shape[0]), "sequence_length": length, "prefill": prefill,
            "scored_tokens_per_sequence": length - prefill, "seconds": round(time.perf_counter() - t0, 1),
            "protocol": "prefill the context, then teacher-forced sequential decoding with the budget "
                        "enforced after every step; reference = the same model with a full fp16 cache"}
    probe_md = ""
    if probe is not None:
        fillers = heldout_sequences(tokenizer, docs, length, probe_fillers)
        meta["probe"], probe_md = add_probe(rows, model, probe, fillers, specs, batch_size, bases)
    write_results(rows, out, meta, probe_md)
    return rows


def add_probe(rows: list[KVEvalRow], model, probe, fillers_XN: torch.Tensor, specs, batch_size: int,
              svd_bases=None) -> tuple[dict, str]:
    """The retrieval probe for the full cache and every spec on `fillers_XN`: each row gets its
    accuracy (overall and by depth); returns (the probe's summary, its markdown table)."""
    budget = {(r.policy, r.ratio): r.budget_ratio for r in rows if r.budget_ratio}  # matched bytes: the same caches
    specs = [(p, budget.get((p, r), r)) for p, r in specs]
    results = probe_eval.evaluate_probe(model, probe, fillers_XN, specs, batch_size, svd_bases=svd_bases)
    for row in rows:
        r = results.get((row.policy, row.budget_ratio or row.ratio), {})
        row.probe_accuracy, row.probe_by_depth = r.get("accuracy"), r.get("by_depth")
    X, N = fillers_XN.shape
    return probe_eval.summary(results, probe, X * len(probe_eval.DEPTHS), N), probe_eval.markdown(results)


TABLE_SKIP = ("nll_per_sequence", "delta_nll_ci95", "probe_by_depth")  # lists/dicts: not table cells


def log_to_wandb(run_dir: Path, cfg, rows: list[KVEvalRow], out: Path, step: int) -> bool:
    """Log the KV table, the plot and per-method scalars to the training run's W&B run (resumed by
    the id in run_dir, under the run's logging config; 'disabled' logs nothing). Returns whether
    anything was logged."""
    from pikv.config import to_dict
    from pikv.logging import MetricsLogger
    logger = MetricsLogger(run_dir, cfg.logging, cfg.train.run_name, to_dict(cfg), enabled=True, resume_step=None)
    try:
        if logger.wandb_run is None:
            return False
        import wandb
        cols = [f.name for f in fields(KVEvalRow) if f.name not in TABLE_SKIP]
        metrics = {"kv_eval/results": wandb.Table(columns=cols, data=[[getattr(r, c) for c in cols] for r in rows]),
                   "kv_eval/plot": wandb.Image(str(out / "results.png"))}
        for r in rows:
            if not r.skipped:
                for name in ("delta_nll", "compression_ratio", "kl", "top1_agreement", "probe_accuracy"):
                    if getattr(r, name) is not None:
                        metrics[f"kv_eval/{r.policy}@{r.ratio:g}x/{name}"] = getattr(r, name)
        logger.wandb_run.log(metrics, step=step)
        return True
    finally:
        logger.close()
