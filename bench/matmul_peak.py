"""Measured matmul peak of this machine (the denominator of the trainer's MFU).

  python bench/matmul_peak.py [--threads N] [--device cpu|cuda] [--dtype fp32|bf16]
"""

import argparse
import statistics

import torch

from pikv.training.throughput import measure_matmul_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    peaks = [measure_matmul_peak(torch.device(args.device), dtype) for _ in range(args.rounds)]
    print(f"device={args.device} dtype={args.dtype} threads={args.threads}: "
          f"median {statistics.median(peaks) / 1e9:.1f} GFLOP/s, max {max(peaks) / 1e9:.1f} "
          f"over {args.rounds} rounds")


if __name__ == "__main__":
    main()
