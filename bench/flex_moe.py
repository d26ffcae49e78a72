"""Flex-MoE vs its ablations on the diabetes study's three modalities (issue 7 evidence).

  OMP_NUM_THREADS=1 python bench/flex_moe.py [--seeds 10] [--steps 150] [--out runs/bench]
  python bench/flex_moe.py --seeds 1 --steps 2        # the quickest end-to-end check (numbers meaningless)

For each training missingness pattern (random, structured) and each seed (seed s also draws
its own patient split, data.split_seed = 1234 + s: 88 held-out patients per split): Flex-MoE
(configs/flex_diabetes.yaml), (a) the same network without the missing-modality bank (missing
modalities zero-filled), (b) a dense model of equal active parameters (every FFN dense with
top_k x expert width). Every model is scored on the held-out patients masked into each of the 7
modality combinations; the table is the mean (and min-max) accuracy over seeds. Writes
<out>/flex_moe.{json,md} (pikv.benchmark: the tables, per-seed accuracies, machine and command).
"""

import argparse
import os
from pathlib import Path

import numpy as np

from pikv.benchmark import Transcript, machine_info, write_report
from pikv.benchmark.runs import train_and_evaluate
from pikv.data.multimodal import NUM_COMBOS, combo_name

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
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    machine = machine_info()
    emit = Transcript()  # prints each line and keeps it for the .md
    per_seed: dict[str, dict[str, list]] = {}

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
            per_seed.setdefault(missing, {})[name] = acc.tolist()
        emit(f"\n### training modalities missing: {missing} ({args.seeds} seeds, {args.steps} steps, "
             "held-out accuracy, mean [min-max])\n")
        emit("| combination | " + " | ".join(rows) + " |")
        emit("|---|" + "---|" * len(rows))
        for j, c in enumerate(combos + ["mean over combinations"]):
            cells = []
            for acc, *_ in rows.values():
                col = acc[:, j] if j < len(combos) else acc.mean(1)
                cells.append(f"{col.mean():.3f} [{col.min():.3f}-{col.max():.3f}]")
            emit(f"| {c} | " + " | ".join(cells) + " |")
        flex_mean = rows["flex-moe"][0].mean(1)
        for name, (acc, *_) in list(rows.items())[1:]:  # paired by seed (same split, same init seed)
            diff = flex_mean - acc.mean(1)
            emit(f"| flex-moe minus {name}, paired over seeds | {diff.mean():+.3f} +- {diff.std(ddof=1):.3f} "
                 f"(sd), better in {int((diff > 0).sum())} of {len(diff)} seeds |")
        emit("| active / total params | " + " | ".join(f"{a:,} / {p:,}" for _, a, p, _ in rows.values()) + " |")
        emit("| train seconds (median) | " + " | ".join(f"{t:.0f}" for *_, t in rows.values()) + " |")
    write_report(args.out, "flex_moe", machine, {"args": vars(args), "combinations": combos,
                                                 "accuracy_per_seed": per_seed}, emit.text)


if __name__ == "__main__":
    main()
