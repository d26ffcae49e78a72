"""Measured matmul peak of this machine (the denominator of the trainer's MFU).

  python bench/matmul_peak.py [--threads N] [--device cpu|cuda] [--dtype fp32|bf16] [--rounds 5] [--out runs/bench]
  python bench/matmul_peak.py --rounds 2          # the quickest end-to-end check

Each round is one `pikv.training.throughput.measure_matmul_peak` (the trainer's own measurement);
the median and max over rounds, the machine and its load go to <out>/matmul_peak.{json,md}.
"""

import argparse
import statistics
from pathlib import Path

import torch

from pikv.benchmark import machine_info, write_report
from pikv.training.throughput import measure_matmul_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    peaks = [measure_matmul_peak(torch.device(args.device), dtype) for _ in range(args.rounds)]
    line = (f"device={args.device} dtype={args.dtype} threads={args.threads}: "
            f"median {statistics.median(peaks) / 1e9:.1f} GFLOP/s, max {max(peaks) / 1e9:.1f} "
            f"over {args.rounds} rounds")
    print(line)
    write_report(args.out, "matmul_peak", machine, {"args": vars(args), "flops_per_s": peaks}, line)


if __name__ == "__main__":
    main()
