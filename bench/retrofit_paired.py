"""Paired differences of per-window NLL between KV rows of train/eval.py result files scored on the
same windows: the retrofitted checkpoint (AFTER) against itself and against the original model scored
with --hf (BEFORE); 95% bootstrap CI (pikv.eval.stats).

  python bench/retrofit_paired.py AFTER/kv/results.json BEFORE/kv/results.json [MORE_AFTER/kv/results.json ...]
"""

import json
import sys

import numpy as np

from pikv.eval.stats import bootstrap_ci


def load_rows(path: str, tag: str) -> dict:
    rows = json.load(open(path))["rows"]
    return {f"{tag} {r['policy']} {r['ratio']:g}x": np.array(r["nll_per_sequence"]) for r in rows
            if r.get("nll_per_sequence")}


def main(after: str, before: str, *more_after: str) -> None:
    nll = {**load_rows(before, "before"), **load_rows(after, "after")}
    for path in more_after:
        nll.update(load_rows(path, "after"))
    learned = [k for k in nll if k.startswith("after learned")]
    print("| A | B | NLL(A) - NLL(B) per window, mean [95% CI], nats (negative: A better) |\n|---|---|---|")
    for a in learned:
        ratio = a.split()[-1]
        for b in nll:
            if b != a and b.endswith(" " + ratio) and not b.startswith("after learned"):
                d = nll[a] - nll[b]
                lo, hi = bootstrap_ci(d)
                print(f"| {a} | {b} | {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    d = nll["after full 1x"] - nll["before full 1x"]
    lo, hi = bootstrap_ci(d)
    print(f"| after full 1x | before full 1x | {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] |")


if __name__ == "__main__":
    main(*sys.argv[1:])
