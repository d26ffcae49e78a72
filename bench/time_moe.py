"""Time-MoE vs seasonal naive and a dense model of equal active parameters (issue 7 evidence).

  OMP_NUM_THREADS=1 python bench/time_moe.py [--seeds 4] [--steps 1000] [--out runs/bench]
  python bench/time_moe.py --seeds 1 --steps 2        # the quickest end-to-end check (numbers meaningless)

Trains configs/time_statsmodels.yaml (sunspots, CO2, ten US macro series) and the dense
variant (every FFN dense, width top_k x expert width + the shared expert's), then forecasts
autoregressively the later windows of the training series (validation split) and the never-seen
series (El Nino, inflation, real interest rate: heldout split). MSE / MAE on the
context-normalised scale, mean over seeds; seasonal naive on the same windows. Writes
<out>/time_moe.{json,md} (pikv.benchmark: the tables, per-seed results, machine and command).
"""

import argparse
import os
from pathlib import Path

import numpy as np

from pikv.benchmark import Transcript, machine_info, write_report
from pikv.benchmark.runs import train_and_evaluate
from pikv.config import load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "time_statsmodels.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    machine = machine_info()
    emit = Transcript()  # prints each line and keeps it for the .md

    cfg = load_config(CONFIG)
    m, moe = cfg.model, cfg.moe
    dense_width = m.top_k * m.expert_ffn_hidden_size + moe.num_shared_experts * m.expert_ffn_hidden_size
    variants = {"time-moe": [], "dense, equal active": ["moe.every_n_layers=0", f"model.ffn_hidden_size={dense_width}"]}
    horizons = cfg.time.eval_horizons
    results = {name: [train_and_evaluate(CONFIG, [f"train.seed={s}", f"train.max_steps={args.steps}", *extra],
                                         ("validation", "heldout")) for s in range(args.seeds)]
               for name, extra in variants.items()}
    for split in ("validation", "heldout"):
        emit(f"\n### {split} windows ({args.seeds} seeds, {args.steps} steps; MSE / MAE, mean over seeds)\n")
        emit("| model | active / total params | " + " | ".join(f"h={h} MSE | h={h} MAE" for h in horizons) + " |")
        emit("|---|---|" + "---|---|" * len(horizons))
        first = next(iter(results.values()))[0]
        naive = " | ".join(f"{first[split][f'snaive_mse_h{h}']:.3f} | {first[split][f'snaive_mae_h{h}']:.3f}"
                           for h in horizons)
        emit(f"| seasonal naive | 0 | {naive} |")
        for name, runs in results.items():
            cells = " | ".join(f"{np.mean([r[split][f'mse_h{h}'] for r in runs]):.3f} | "
                               f"{np.mean([r[split][f'mae_h{h}'] for r in runs]):.3f}" for h in horizons)
            emit(f"| {name} | {runs[0]['active_params']:,} / {runs[0]['params']:,} | {cells} |")
        moe_runs, dense_runs = results.values()
        for h in horizons:  # paired by seed
            diff = np.array([d[split][f"mse_h{h}"] - m[split][f"mse_h{h}"] for m, d in zip(moe_runs, dense_runs)])
            emit(f"\nh={h}: dense minus time-moe MSE per seed {np.round(diff, 3).tolist()}, "
                 f"time-moe better in {int((diff > 0).sum())} of {len(diff)}")
    write_report(args.out, "time_moe", machine, {"args": vars(args), "results": results}, emit.text)


if __name__ == "__main__":
    main()
