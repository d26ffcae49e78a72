"""The learned KV cache vs every training-free policy, pooled over training seeds.

  python bench/kv_seeds.py RUN_A/eval/kv RUN_B/eval/kv ... [--method learned] [--out FILE.md]

Each argument is the `kv/` folder `train/eval.py --kv ...` wrote for one run of the same config
with another `train.seed`, evaluated on the same held-out sequences (same data, `--max-sequences`,
`--prefill`). One run's paired intervals (results.md) only cover sequence noise; how far the table
moves between initial models is the other half (docs/benchmarks.md, "KV cache"). Per ratio and
policy this prints each seed's mean ΔNLL (`method` minus policy, per sequence), how many seeds have
it below 0, and the seed-averaged per-sequence ΔNLL with a bootstrap 95% interval over sequences
(which still treats the seeds as fixed: with 3 seeds, a sign shared by all of them is the sturdier
evidence). The statistics are `pikv.benchmark.seeds`. This script times nothing: with --out it
writes the table and, beside it (FILE.json), the inputs and the command (`pikv.benchmark`).
"""

import argparse
import sys
from pathlib import Path

from pikv.benchmark import machine_info, write_report
from pikv.benchmark.seeds import load_runs, pooled_table


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="the kv/ output folders of train/eval.py, one per seed")
    ap.add_argument("--method", default="learned")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    machine = machine_info()
    try:
        table = pooled_table(load_runs(args.dirs), args.method)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(table)
    if args.out:
        write_report(args.out.parent, args.out.stem, machine,
                     {"runs": [str(d) for d in args.dirs], "method": args.method}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
