"""Paired differences of per-window NLL between KV rows of train/eval.py result files scored on the
same windows: the retrofitted checkpoint (AFTER) against itself and against the original model scored
with --hf (BEFORE); 95% bootstrap CI (pikv.eval.stats).

  python bench/retrofit_paired.py AFTER/kv/results.json BEFORE/kv/results.json [MORE_AFTER/kv/results.json ...]

Methods of one model against each other (rows of one or more result files of the same checkpoint and
windows; a later file's row replaces an earlier one of the same method and ratio): every
learned-storage row minus every other row at the same requested ratio.

  python bench/retrofit_paired.py --within A/kv/results.json [B/kv/results.json ...]
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


def within(*paths: str) -> None:
    nll = {}
    for path in paths:
        nll.update({k.split(" ", 1)[1]: v for k, v in load_rows(path, "-").items()})
    print("| A | B | NLL(A) - NLL(B) per window, mean [95% CI], nats (negative: A better) |\n|---|---|---|")
    for a in (k for k in nll if k.startswith("learned")):
        for b in (k for k in nll if k != a and k.split()[-1] == a.split()[-1]):
            d = nll[a] - nll[b]
            lo, hi = bootstrap_ci(d)
            print(f"| {a} | {b} | {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] |")


if __name__ == "__main__":
    within(*sys.argv[2:]) if sys.argv[1:2] == ["--within"] else main(*sys.argv[1:])
