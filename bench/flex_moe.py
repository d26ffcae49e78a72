"""Flex-MoE vs its ablations on the diabetes study's three modalities (issue 7 evidence).

  OMP_NUM_THREADS=1 python bench/flex_moe.py [--seeds 10] [--steps 150]

For each training missingness pattern (random, structured) and each seed (seed s also draws
its own patient split, data.split_seed = 1234 + s: 88 held-out patients per split): Flex-MoE
(configs/flex_diabetes.yaml), (a) the same network without the missing-modality bank (missing
modalities zero-filled), (b) a dense model of equal active parameters (every FFN dense with
top_k x expert width). Every model is scored on the held-out patients masked into each of the 7
modality combinations; the table is the mean (and min-max) accuracy over seeds.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _train import train_and_evaluate  # noqa: E402

from pikv.data.multimodal import NUM_COMBOS, combo_name  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "flex_diabetes.yaml")
VARIANTS = {
    "flex-moe": [],
    "no bank (zero-fill)": ["flex.bank=false"],
    "dense, equal active": ["moe.every_n_layers=0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    combos = [combo_name(c) for c in range(NUM_COMBOS)]
    for missing in ("random", "structured"):
        rows = {}
        for name, extra in VARIANTS.items():
            runs = [train_and_evaluate(CONFIG, [f"flex.missing={missing}", f"train.seed={s}",
                                                f"data.split_seed={1234 + s}",
                                                f"train.max_steps={args.steps}", *extra])
                    for s in range(args.seeds)]
            acc = np.array([[r["heldout"][f"accuracy/{c}"] for c in combos] for r in runs])
            rows[name] = (acc, runs[0]["active_params"], runs[0]["params"], np.median([r["seconds"] for r in runs]))
        print(f"\n### training modalities missing: {missing} ({args.seeds} seeds, {args.steps} steps, "
              "held-out accuracy, mean [min-max])\n")
        print("| combination | " + " | ".join(rows) + " |")
        print("|---|" + "---|" * len(rows))
        for j, c in enumerate(combos + ["mean over combinations"]):
            cells = []
            for acc, *_ in rows.values():
                col = acc[:, j] if j < len(combos) else acc.mean(1)
                cells.append(f"{col.mean():.3f} [{col.min():.3f}-{col.max():.3f}]")
            print(f"| {c} | " + " | ".join(cells) + " |")
        flex_mean = rows["flex-moe"][0].mean(1)
        for name, (acc, *_) in list(rows.items())[1:]:  # paired by seed (same split, same init seed)
            diff = flex_mean - acc.mean(1)
            print(f"| flex-moe minus {name}, paired over seeds | {diff.mean():+.3f} +- {diff.std(ddof=1):.3f} "
                  f"(sd), better in {int((diff > 0).sum())} of {len(diff)} seeds |")
        print("| active / total params | " + " | ".join(f"{a:,} / {p:,}" for _, a, p, _ in rows.values()) + " |")
        print("| train seconds (median) | " + " | ".join(f"{t:.0f}" for *_, t in rows.values()) + " |")


if __name__ == "__main__":
    main()
