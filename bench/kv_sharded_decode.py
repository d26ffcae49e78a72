"""Decode tokens/s with the KV cache sharded over 2 processes (1 thread each) vs 1 process (1 thread),
batch 1, over context lengths; the merge collective's share of the sharded step.

  OMP_NUM_THREADS=1 python bench/kv_sharded_decode.py [--contexts 4096,8192,16384,32768] [--world 2]
      [--steps 8] [--repeats 7] [--moe] [--out DIR]
  python bench/kv_sharded_decode.py --contexts 512 --steps 2 --repeats 2   # quickest check

The bench forks `--world` gloo processes itself (pikv.testing.run_distributed) for each context,
so both configurations run in the same run: rank 0 also holds a plain single-process cache (filled
in the parent before the fork). The model is
the default configuration (pikv/config/) with dense FFN layers (`--moe`: the default MoE layers),
max_seq_len raised to the longest context, random weights (speed does not depend on them): the
attention-bound regime the sharding is for. Every cache is filled to the context by feeding random
keys/values through `cache.attend` in chunks (bench/kv_decode_speed.py `fill`; a sharded cache keeps
its share), then rounds alternate: rank 0 times `--steps` decode steps of the whole model on the
single-process cache while the other ranks wait at a barrier, then every rank times `--steps` steps
on the sharded cache (its time: the slowest rank's). Each context: 1 warm-up round + `--repeats`.
The table gives medians over rounds, the median of the per-round speed-ups, the collective's
share of the sharded step (time inside the merge's all_gather, the slowest rank's, waiting for the
other ranks included: load imbalance and a descheduled peer show there), and the speed-up of the
time outside the collective (the slowest rank's: what the split of the attention itself gains),
and the median time of the same all_gather with no compute around it (the collective's latency on
this machine at that moment).
Writes <out>/kv_sharded_decode.{json,md}.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pikv.kv.sharded as sharded  # noqa: E402
from pikv.benchmark import machine_info, write_report  # noqa: E402
from pikv.benchmark.harness import median_interval  # noqa: E402
from pikv.config import ModelConfig, MoEConfig  # noqa: E402
from pikv.kv import make_cache  # noqa: E402
from pikv.models import Transformer  # noqa: E402
from pikv.testing import run_distributed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_decode_speed import decode, fill  # noqa: E402


def timed_collective(seconds: list):
    """Wrap the sharded cache's all_gather: its wall time accumulates in seconds[0]."""
    inner = sharded._all_gather

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        seconds[0] += time.perf_counter() - t0
        return out
    sharded._all_gather = wrapped


def _round(model, base, cache, steps: int, rank: int, collective: list) -> tuple:
    """(single-process seconds or None, sharded seconds, sharded seconds outside the collective,
    collective seconds: the slowest rank's each)."""
    dist.barrier()
    t_base = None
    if rank == 0:
        t0 = time.perf_counter()
        decode(model, base, 1, steps)()
        t_base = time.perf_counter() - t0
    dist.barrier()
    collective[0] = 0.0
    t0 = time.perf_counter()
    decode(model, cache, 1, steps)()
    t = time.perf_counter() - t0
    times = torch.tensor([t, t - collective[0], collective[0]])
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # outside the timed steps
    return (t_base, *times.tolist())


def _worker(rank, world, model, base, S: int, args):
    """One context: fill this rank's share, then the rounds. `base` (filled by the parent before
    the fork: a rank waiting for another's long solo fill would hit gloo's timeout) is timed on rank 0."""
    torch.set_num_threads(1)
    collective = [0.0]
    timed_collective(collective)
    cache = make_cache("full", model, total_tokens=S + args["extra"], shard_group=dist.group.WORLD)
    fill(model, cache, 1, S)
    rounds = [_round(model, base, cache, args["steps"], rank, collective) for _ in range(args["repeats"] + 1)][1:]
    alone = _collective_alone(model.cfg, collective)
    return {**_row(S, rounds, args["steps"], base.nbytes(), cache.nbytes()), "all_gather_alone_s": alone} \
        if rank == 0 else None


def _collective_alone(cfg, collective: list, calls: int = 32) -> float:
    """Median seconds of the merge's all_gather with no compute around it (a decode step's
    [1, N, 1, D + 1] fp32 per rank): the machine's latency for one collective right now."""
    x = torch.zeros(1, cfg.num_heads, 1, cfg.hidden_size // cfg.num_heads + 1)
    out = x.new_empty(dist.get_world_size() * 1, *x.shape[1:])
    times = []
    for _ in range(calls):
        collective[0] = 0.0
        sharded._all_gather(out, x, group=dist.group.WORLD)
        times.append(collective[0])
    return statistics.median(times)


def _row(S: int, rounds: list, steps: int, base_bytes: int, shard_bytes: int) -> dict:
    t_base, t_shard, t_compute, t_coll = zip(*rounds)
    speedups = [b / s for b, s in zip(t_base, t_shard)]
    lo, hi, cover = median_interval(speedups)
    return {"context": S, "tokens_per_s_1proc": steps / statistics.median(t_base),
            "tokens_per_s_sharded": steps / statistics.median(t_shard), "speedup": statistics.median(speedups),
            "speedup_interval": [lo, hi, cover], "collective_share": statistics.median(
                [min(c, s) / s for c, s in zip(t_coll, t_shard)]),
            "speedup_outside_collective": statistics.median([b / c for b, c in zip(t_base, t_compute)]),
            "kv_bytes_1proc": base_bytes, "kv_bytes_rank0": shard_bytes,
            "seconds": {"1proc": t_base, "sharded": t_shard, "outside_collective": t_compute, "collective": t_coll}}


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--moe", action="store_true", help="the default MoE layers instead of dense FFN layers")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    machine = machine_info()
    contexts = [int(c) for c in args.contexts.split(",")]
    opts = {"contexts": contexts, "steps": args.steps, "repeats": args.repeats, "moe": args.moe,
            "extra": args.steps * (args.repeats + 1) + 2}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=max(contexts) + opts["extra"])
    model = Transformer(cfg, MoEConfig() if args.moe else MoEConfig(every_n_layers=0)).eval()
    rows = []
    for S in contexts:
        base = make_cache("full", model, total_tokens=S + opts["extra"])  # the single-process cache
        fill(model, base, 1, S)
        rows.append(run_distributed(_worker, args.world, model, base, S, opts, timeout_s=24 * 3600)[0])
        print(rows[-1], flush=True)
        del base
    lines = [f"| context | 1 process tok/s | {args.world} processes tok/s | speed-up (median of rounds) "
             "| interval of the median (coverage) | collective share | speed-up outside the collective | all_gather alone (ms) "
             "| KV bytes rank 0 / 1 process |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi, cover = r["speedup_interval"]
        lines.append(f"| {r['context']} | {r['tokens_per_s_1proc']:.1f} | {r['tokens_per_s_sharded']:.1f} | "
                     f"**{r['speedup']:.2f}x** | {lo:.2f}-{hi:.2f} ({cover:.0%}) | {r['collective_share']:.1%} | "
                     f"{r['speedup_outside_collective']:.2f}x | {r['all_gather_alone_s'] * 1e3:.2f} | "
                     f"{r['kv_bytes_rank0'] / r['kv_bytes_1proc']:.3f} |")
    _, md = write_report(args.out, "kv_sharded_decode", machine, {**opts, "world": args.world, "rows": rows},
                         "\n".join(lines))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
