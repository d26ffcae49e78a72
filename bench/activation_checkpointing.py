"""Peak memory and time of a training step of the default model with activation checkpointing.

  python bench/activation_checkpointing.py [--seq 1024] [--rounds 3] [--steps 1] [--out bench/results]

The step is the real Trainer's `train_step` (forward + backward + AdamW, the KV compressor's
schedule included) of the default job (configs/tiny.yaml) at data.seq_len=model.max_seq_len=1024,
with train.activation_checkpointing none (the baseline), full and selective.

Memory method: each (round, case) runs in a fresh subprocess, so no case inherits another's
allocator state. After set-up (model, data, one process group) the child resets the kernel's
resident-set high-water mark (`echo 5 > /proc/self/clear_refs`), reads VmRSS, runs the first
training step and reads VmHWM: the step's peak is VmHWM - VmRSS, everything the step holds at its
worst moment (activations, gradients, the AdamW state it creates) and nothing of the set-up.
torch's CPU tensors come from malloc / mmap, which tracemalloc does not see; the resident set sees
every byte, including what the allocator keeps (an upper bound on the live tensors). The
process's absolute high-water mark is recorded too. Time: `--steps` more steps after the first,
their median, per child. Cases rotate within rounds; ratios are taken against the baseline of the
same round, then summarised by their median and the harness's distribution-free interval for it
(min-max below 6 rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pikv.benchmark.harness import Timings, Transcript, machine_info, median_interval, run_rounds, write_report  # noqa: E402

MODES = ("none", "full", "selective")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(mode: str, seq: int, steps: int) -> dict:
    """One case in this (fresh) process: the first step's peak memory, then `steps` timed steps."""
    from pikv.benchmark.train_step import step_trainer

    trainer = step_trainer([f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                            f"train.activation_checkpointing={mode}"])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS:")
    trainer.train_step()
    step_peak = _status_bytes("VmHWM:") - before
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    return {"step_peak_bytes": step_peak, "process_peak_bytes": _status_bytes("VmHWM:"),
            "rss_before_step_bytes": before, "step_s": statistics.median(seconds)}


def _run_child(mode: str, seq: int, steps: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--seq", str(seq), "--steps", str(steps)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_table(per_round: dict[str, list[dict]], rounds: int) -> tuple[str, dict]:
    lines = ["| activation checkpointing | step peak MiB (median) | process peak MiB | peak vs none (median of "
             f"{rounds} rounds) [interval] |", "|---|---|---|---|"]
    summary = {}
    for mode, rows in per_round.items():
        ratios = [r["step_peak_bytes"] / b["step_peak_bytes"] for r, b in zip(rows, per_round["none"])]
        lo, hi, _ = median_interval(ratios)
        peak = statistics.median(r["step_peak_bytes"] for r in rows) / 2**20
        proc = statistics.median(r["process_peak_bytes"] for r in rows) / 2**20
        summary[mode] = {"step_peak_mib": peak, "process_peak_mib": proc, "ratio": statistics.median(ratios),
                         "ratio_low": lo, "ratio_high": hi}
        lines.append(f"| {mode} | {peak:.0f} | {proc:.0f} | {statistics.median(ratios):.3f}x [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(lines) + "\n", summary


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024, help="data.seq_len = model.max_seq_len")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per child after the measured first step")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.steps)))
        return
    machine = machine_info()
    timings = run_rounds({m: (lambda m=m: _run_child(m, args.seq, args.steps)) for m in MODES},
                         rounds=args.rounds, warmup=0)
    per_round = timings.returned
    emit = Transcript()
    memory_md, memory = _memory_table(per_round, timings.rounds)
    emit(memory_md)
    step = Timings("none", {m: [r["step_s"] for r in rows] for m, rows in per_round.items()}, timings.orders)
    emit(step.markdown(unit="s", label="activation checkpointing (step time)"))
    write_report(Path(args.out), "activation_checkpointing", machine,
                 {"seq_len": args.seq, "memory": memory, "step_time": step.summary(), "per_round": per_round},
                 emit.text, title=f"Activation checkpointing: default model, data.seq_len={args.seq}")


if __name__ == "__main__":
    main(sys.argv[1:])
