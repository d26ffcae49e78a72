"""Expert-parallel MoE layer step: where the time goes, and what crosses the wire.

  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/moe_ep.py [--tokens 4096 ...] [--out runs/bench]
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/moe_ep.py --tokens 64 --hidden 32 --ffn 32 \
      --warmup 1 --repeats 2      # the quickest end-to-end check

Each rank runs forward+backward of one PiKV MoE layer (fp32) on its own tokens at EP = world
size. Every torch.distributed.all_to_all_single call (count exchange, token dispatch, combine,
and both backward exchanges) is timed; the rest of the step is routing, permutation and expert
compute. Also reports the bytes sent per token and checks they equal the routed rows exactly
(no padding). With --deepspeed, deepspeed.moe.layer.MoE at the same ep_size is measured the
same way in the same run: the layers take turns step by step (pikv.benchmark, a barrier before
each step), so load from other processes falls on all of them alike. Writes <out>/moe_ep.{json,md}
on rank 0.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pikv.benchmark import machine_info, run_rounds, write_report
from pikv.distributed import init_distributed
from pikv.models.parallelize import apply_parallelism
from pikv.moe import create_moe

_A2A = {"seconds": 0.0, "calls": 0}
_original_a2a = dist.all_to_all_single


def _timed_all_to_all_single(*args, **kwargs):
    start = time.perf_counter()
    out = _original_a2a(*args, **kwargs)
    _A2A["seconds"] += time.perf_counter() - start
    _A2A["calls"] += 1
    return out


dist.all_to_all_single = _timed_all_to_all_single  # gloo on CPU: every call is synchronous


def _measure(steps: dict, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Per layer: median step seconds and median share of it inside all_to_all_single."""
    def reset() -> None:
        dist.barrier()
        _A2A["seconds"] = 0.0

    def timed(step):
        def run() -> float:
            step()
            return _A2A["seconds"]
        return run

    t = run_rounds({name: timed(step) for name, step in steps.items()}, rounds=repeats, warmup=warmup,
                   before_each=reset)
    return {name: (t.median(name), statistics.median(a / s for a, s in zip(t.returned[name], t.seconds[name])))
            for name in steps}


def _pikv_step(args, ctx, x):
    layer = create_moe("base", args.hidden, args.experts, args.top_k, args.ffn)
    apply_parallelism(layer, ctx)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    return layer, step


def _deepspeed_step(args, ctx, x):
    import importlib

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(".cache", "torch_extensions"))
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")

    class SwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(args.hidden, args.ffn, bias=False)
            self.w3 = torch.nn.Linear(args.hidden, args.ffn, bias=False)
            self.w2 = torch.nn.Linear(args.ffn, args.hidden, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    # DeepSpeed's all-to-all needs equal sizes on every rank: tokens are padded to a fixed
    # capacity (its drop_tokens=False path sizes the capacity per rank and breaks on gloo with
    # "Received data size doesn't match"). 1.25 is the usual training capacity factor.
    layer = MoE(args.hidden, SwiGLU(), num_experts=args.experts, ep_size=ctx.ep_size, k=args.top_k,
                capacity_factor=1.25, drop_tokens=True, top2_2nd_expert_sampling=False)
    x3 = x.view(1, -1, args.hidden)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x3)[0].sum().backward()

    return layer, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    machine = machine_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_distributed("cpu", "gloo", ep_size=world)
    torch.manual_seed(1234 + ctx.rank)
    x = torch.randn(args.tokens, args.hidden)
    layer, step = _pikv_step(args, ctx, x)
    steps = {"pikv": step}
    if args.deepspeed:
        steps["deepspeed"] = _deepspeed_step(args, ctx, x)[1]
    results = _measure(steps, args.warmup, args.repeats)
    rows_sent = layer.dispatcher.last_bytes_sent // (args.hidden * x.element_size())
    assert rows_sent == args.tokens * args.top_k, "dropless dispatch must send exactly T*K rows"
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if ctx.is_main:
        lines = [f"EP={world} (gloo, fp32), {args.tokens} tokens/rank, H={args.hidden}, F={args.ffn}, "
                 f"E={args.experts}, k={args.top_k}; dispatch bytes/token = {args.top_k * args.hidden * 4} "
                 f"(= k*H*4: exactly the routed rows, no padding)", "",
                 "| layer | step ms (median over ranks) | all-to-all share | compute + routing share |",
                 "|---|---|---|---|"]
        for name in results:
            ms = statistics.median(r[name][0] for r in gathered) * 1e3
            share = statistics.median(r[name][1] for r in gathered)
            lines.append(f"| {name} | {ms:.1f} | {share:.1%} | {1 - share:.1%} |")
        print("\n".join(lines))
        write_report(args.out, "moe_ep", machine, {"args": vars(args), "world_size": world,
                                                   "per_rank": gathered}, "\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
