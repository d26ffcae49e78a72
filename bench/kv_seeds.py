"""The learned KV cache vs every training-free policy, pooled over training seeds.

  python bench/kv_seeds.py RUN_A/eval/kv RUN_B/eval/kv ... [--method learned] [--out FILE.md]

Each argument is the `kv/` folder `train/eval.py --kv ...` wrote for one run of the same config
with another `train.seed`, evaluated on the same held-out sequences (same data, `--max-sequences`,
`--prefill`). One run's paired intervals (results.md) only cover sequence noise; how far the table
moves between initial models is the other half (docs/benchmarks.md, "KV cache"). Per ratio and
policy this prints each seed's mean ΔNLL (`method` minus policy, per sequence), how many seeds have
it below 0, and the seed-averaged per-sequence ΔNLL with a bootstrap 95% interval over sequences
(which still treats the seeds as fixed: with 3 seeds, a sign shared by all of them is the sturdier
evidence).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pikv.eval.kv import bootstrap_ci  # noqa: E402


def load_runs(dirs: list[Path]) -> list[dict]:
    runs = []
    for d in dirs:
        report = json.loads((d / "results.json").read_text())
        runs.append({(r["policy"], r["ratio"]): np.array(r["nll_per_sequence"])
                     for r in report["rows"] if r.get("nll_per_sequence")})
    lengths = {len(v) for run in runs for v in run.values()}
    if len(lengths) != 1:
        raise SystemExit(f"runs were evaluated on different numbers of sequences {sorted(lengths)}: "
                         "re-evaluate them with the same --max-sequences")
    return runs


def pooled_table(runs: list[dict], method: str) -> str:
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


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="the kv/ output folders of train/eval.py, one per seed")
    ap.add_argument("--method", default="learned")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    table = pooled_table(load_runs(args.dirs), args.method)
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
