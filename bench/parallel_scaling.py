"""How much of a second core a second 1-thread process gets on this machine, for the decode step's
memory-bound attention and for a compute-bound matmul: the ceiling on what sharding the KV cache over
2 processes can gain here (bench/kv_sharded_decode.py; issue 18).

  python bench/parallel_scaling.py [--rounds 5] [--seconds 4] [--context 131072] [--out runs/bench]

Each round times one process alone, then two processes at once (forked, 1 thread each), for each
kernel. "attention": one decode query's scores, softmax and weighted sum over `--context` keys of 2 kv
heads x 32 dims in fp32 (3 query heads per kv head: the default model's shapes), so the keys and values
(64 MiB at 131072) do not fit in cache and the step reads memory. "matmul": 256x256 fp32 matmuls,
which stay in cache. The report gives each process's speed in the pair ÷ the lone process's in the
same round: sharded decoding runs in lock step, so the slower of the pair bounds it.
"""

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pikv.benchmark import machine_info, write_report  # noqa: E402


def _kernel(name: str, context: int):
    torch.manual_seed(0)
    if name == "attention":
        k, v, q = torch.randn(2, context, 32), torch.randn(2, context, 32), torch.randn(2, 3, 32)
        return lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    return lambda: a @ b


def _rate(name: str, context: int, seconds: float, start, out) -> None:
    """Calls per second of the kernel, timed after `start` is set (both processes of a pair at once)."""
    torch.set_num_threads(1)
    step = _kernel(name, context)
    for _ in range(3):
        step()
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    out.put(n / (time.perf_counter() - t0))


def _run(name: str, procs: int, context: int, seconds: float) -> list[float]:
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_rate, args=(name, context, seconds, start, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(1.0)  # both built their tensors
    start.set()
    rates = sorted(out.get() for _ in workers)
    for w in workers:
        w.join()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args()
    machine = machine_info()
    rows, data = [], {}
    for name in ("attention", "matmul"):
        slow, fast = [], []
        for _ in range(args.rounds):
            alone = _run(name, 1, args.context, args.seconds)[0]
            pair = _run(name, 2, args.context, args.seconds)
            slow.append(pair[0] / alone)
            fast.append(pair[1] / alone)
        data[name] = {"slower_of_pair": slow, "faster_of_pair": fast}
        rows.append(f"| {name} | {statistics.median(slow):.2f} ({min(slow):.2f}-{max(slow):.2f}) | "
                    f"{statistics.median(fast):.2f} ({min(fast):.2f}-{max(fast):.2f}) | "
                    f"{statistics.median([s + f for s, f in zip(slow, fast)]):.2f} |")
    md = ("| kernel | slower of the pair ÷ alone, median (range) | faster of the pair ÷ alone | pair's total ÷ alone |\n"
          "|---|---|---|---|\n" + "\n".join(rows))
    print(md)
    write_report(args.out, "parallel_scaling", machine, {"args": vars(args), **data}, md,
                 title="Two 1-thread processes at once vs one alone")


if __name__ == "__main__":
    main()
