"""Step time of the default model with train.compile=true against eager, and the compile time.

  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_step.py [--rounds 15] [--warmup 4] [--out bench/results]

Two Trainers of the default job (configs/tiny.yaml) in this process, one eager, one with every
block compiled (pikv.models.parallelize.apply_compile); each round runs one real `train_step`
(forward + backward + AdamW, KV compressor schedule included) of each, in rotating order, and the
ratio compiled / eager is taken within the round. Compile time: the compiled trainer's first
`--warmup` steps (the compressor's rank cycle makes the first steps compile one graph each) minus
the eager trainer's same steps; inductor caches compiled kernels on disk, so it is the cold
compile time only with TORCHINDUCTOR_CACHE_DIR pointing to an empty folder. The graph breaks of one block are listed with torch._dynamo.explain.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pikv.benchmark.harness import Transcript, machine_info, run_rounds, write_report  # noqa: E402
from pikv.benchmark.train_step import step_trainer  # noqa: E402


def graph_breaks(trainer) -> list[str]:
    """Break reasons of the first block of `trainer.model`, traced (not compiled) in training mode."""
    model = trainer.model
    cfg = model.cfg
    x = torch.randn(2, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model.layers[0])(x, model.rope, 0)
    return [f"{b.reason.splitlines()[0]} ({b.user_stack[-1].filename}:{b.user_stack[-1].lineno})"
            if b.user_stack else b.reason.splitlines()[0] for b in explained.break_reasons]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=4, help="steps of each trainer before timing (compilation)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    machine = machine_info()
    trainers = {"eager": step_trainer(["train.run_name=eager"]),
                "compiled": step_trainer(["train.run_name=compiled", "train.compile=true"])}
    breaks = graph_breaks(trainers["eager"])
    warm = {}
    for name, trainer in trainers.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        warm[name] = time.perf_counter() - start
    timings = run_rounds({name: trainer.train_step for name, trainer in trainers.items()}, rounds=args.rounds,
                         warmup=0, baseline="eager")
    emit = Transcript()
    emit(timings.markdown(unit="ms", label="default model, one training step"))
    compile_s = warm["compiled"] - warm["eager"]
    emit(f"Compile time: {compile_s:.1f} s (first {args.warmup} compiled steps {warm['compiled']:.1f} s, "
         f"eager {warm['eager']:.1f} s). Graph breaks in a block (dropless MoE, one process): {len(breaks)}"
         + "".join(f"\n- {b}" for b in breaks))
    write_report(Path(args.out), "compile_step", machine,
                 {"step_time": timings.summary(), "compile_s": compile_s, "warmup_s": warm, "graph_breaks": breaks},
                 emit.text, title="torch.compile: default model training step")


if __name__ == "__main__":
    main(sys.argv[1:])
