"""The learned KV cache vs every training-free policy, pooled over training seeds (bench/kv_seeds.py).

Input: the `kv/` folders `train/eval.py --kv ...` wrote for runs of one config that differ only in
`train.seed`, evaluated on the same held-out sequences. Per ratio and policy: each seed's mean ΔNLL
(`method` minus policy, per sequence), how many seeds have it below 0, and the seed-averaged
per-sequence ΔNLL with a bootstrap 95% interval over sequences (which treats the seeds as fixed:
with 3 seeds, a sign shared by all of them is the sturdier evidence).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pikv.eval.kv import bootstrap_ci


def load_runs(dirs: list[Path]) -> list[dict]:
    """Per run: {(policy, ratio): per-sequence NLL array} from its results.json (skipped rows left out)."""
    runs = []
    for d in dirs:
        report = json.loads((Path(d) / "results.json").read_text())
        runs.append({(r["policy"], r["ratio"]): np.array(r["nll_per_sequence"])
                     for r in report["rows"] if r.get("nll_per_sequence")})
    lengths = {len(v) for run in runs for v in run.values()}
    if len(lengths) != 1:
        raise ValueError(f"runs were evaluated on different numbers of sequences {sorted(lengths)}: "
                         "re-evaluate them with the same --max-sequences")
    return runs


def pooled_table(runs: list[dict], method: str) -> str:
    """Markdown: one row per (ratio, other policy) that every run evaluated beside `method`."""
    lines = ["| ratio | other | ΔNLL per seed | seeds < 0 | seed-mean ΔNLL [95% CI over sequences] |",
             "|---|---|---|---|---|"]
    keys = sorted({k for run in runs for k in run if k[0] not in (method, "full")}, key=lambda k: (k[1], k[0]))
    for other, ratio in keys:
        if not all((method, ratio) in run and (other, ratio) in run for run in runs):
            continue
        per_seed = np.stack([run[(method, ratio)] - run[(other, ratio)] for run in runs])  # [seeds, sequences]
        means = per_seed.mean(1)
        pooled = per_seed.mean(0)
        lo, hi = bootstrap_ci(pooled)
        lines.append(f"| {ratio:g} | {other} | {', '.join(f'{m:+.4f}' for m in means)} | "
                     f"{int((means < 0).sum())}/{len(runs)} | {pooled.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    return "\n".join(lines) + "\n"
