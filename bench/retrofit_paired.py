"""Paired differences of per-window NLL between KV rows of train/eval.py result files scored on the
same windows: the retrofitted checkpoint (AFTER) against itself and against the original model scored
with --hf (BEFORE); 95% bootstrap CI (pikv.eval.stats). bench/kv_vs_kvpress.py --protocol decode
writes the same format (rows `kvpress:NAME`), so kvpress's presses pair too.

  python bench/retrofit_paired.py AFTER/kv/results.json BEFORE/kv/results.json [MORE_AFTER/kv/results.json ...]
  python bench/retrofit_paired.py --after A1.json A2.json --before B1.json B2.json [--learned learned,learned@4+h2o]
  python bench/retrofit_paired.py --after A1.json A2.json    # methods of one model against each other
  python bench/retrofit_paired.py --after RUN3.json --before RUN2.json --own-full   # compression costs

Rows: every learned row of AFTER (--learned: which; default every policy starting with `learned`) minus
every other row at the same requested ratio, then AFTER's full cache minus BEFORE's. Files of one side
must be the same windows: their `windows_sha256` (when recorded) must agree, and a full-cache row seen
twice on one side is kept once, the largest per-window difference between the copies printed (the
pikv port of an exported model against the checkpoint it came from: fp32 rounding only).
--own-full compares compression costs instead: each row's per-window NLL minus its own side's full
cache before the difference, so two models whose full caches differ (a retrofit that also adapted
to the domain, against the frozen fit or the original) are compared on what the cache loses.
"""

import argparse
import json
import sys

import numpy as np

from pikv.eval.stats import bootstrap_ci


def load_rows(path: str, tag: str, into: dict, digests: dict) -> None:
    """Add `tag policy ratio` -> per-window NLL of `path`'s rows to `into` (a key seen before is kept)."""
    report = json.load(open(path))
    if report.get("windows_sha256"):
        digests[path] = report["windows_sha256"]
    for r in report["rows"]:
        if not r.get("nll_per_sequence"):
            continue
        key, nll = f"{tag} {r['policy']} {r['ratio']:g}x", np.array(r["nll_per_sequence"])
        if key in into:
            if len(into[key]) != len(nll):
                raise ValueError(f"{path}: {key} has {len(nll)} windows, an earlier file {len(into[key])}")
            print(f"windows check: {key} of {path} differs from the first file's by at most "
                  f"{np.abs(into[key] - nll).max():.2e} nats per window")
            continue
        into[key] = nll


def paired_table(nll: dict, learned: list[str], own_full: bool = False) -> str:
    lines = ["| A | B | NLL(A) - NLL(B) per window, mean [95% CI], nats (negative: A better) |", "|---|---|---|"]
    mine = [k for k in nll if k.startswith("after ") and k.split()[1] in learned]
    for a in mine:
        ratio = a.split()[-1]
        for b in nll:
            if b != a and b.endswith(" " + ratio) and b not in mine:
                lines.append(row(a, b, nll, own_full))
    for tag in ("after", "before"):
        if f"{tag} full 1x" not in nll:
            return "\n".join(lines) + "\n"
    lines.append(row("after full 1x", "before full 1x", nll))
    return "\n".join(lines) + "\n"


def row(a: str, b: str, nll: dict, own_full: bool = False) -> str:
    d = nll[a] - nll[b]
    if own_full:  # each side's cost against its own full cache
        d = d - (nll[a.split()[0] + " full 1x"] - nll[b.split()[0] + " full 1x"])
    lo, hi = bootstrap_ci(d)
    return f"| {a} | {b} | {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] |"


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):  # the positional form: AFTER BEFORE [MORE_AFTER ...]
        argv = ["--after", argv[0], *argv[2:], "--before", argv[1]]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--after", nargs="+", required=True, help="results.json files of the retrofitted model")
    ap.add_argument("--before", nargs="+", default=[], help="results.json files of the original model")
    ap.add_argument("--learned", default=None, help="AFTER's methods to compare (default: every learned* row)")
    ap.add_argument("--own-full", action="store_true", help="difference of each row's NLL minus its own side's full cache")
    args = ap.parse_args(argv)
    nll: dict = {}
    digests: dict = {}
    for tag, paths in (("after", args.after), ("before", args.before)):
        for path in paths:
            load_rows(path, tag, nll, digests)
    if len(set(digests.values())) > 1:
        raise ValueError(f"the files scored different windows (windows_sha256): {digests}")
    learned = args.learned.split(",") if args.learned else sorted({k.split()[1] for k in nll if
                                                                   k.startswith("after learned")})
    print(f"windows: {next(iter(digests.values()), 'no windows_sha256 recorded')} ({len(digests)} files record it)")
    if args.own_full and not all(f"{t} full 1x" in nll for t in ("after", "before") if any(
            k.startswith(t + " ") for k in nll)):
        raise ValueError("--own-full needs a full-cache row (policy full) in the files of each side")
    print(paired_table(nll, learned, args.own_full))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
