"""Forward + backward time of one MoE layer against a dense SwiGLU FFN with the same active FLOPs.

  python bench/moe_layer.py                                  # T=4096, H=512, E/F = 8/1024 and 32/256, k=2
  python bench/moe_layer.py --threads 1 --shapes 32x256 --iters 20 --profile
  python bench/moe_layer.py --tokens 64 --hidden 32 --shapes 4x16 --iters 2 --warmup 1 --rounds 1  # quick check

Shapes: T tokens, H hidden, E experts, F expert FFN hidden, K experts per token.
Every variant uses the same SwiGLU expert y = w2(silu(w1 x) * w3 x), so the matmul FLOPs per
token are equal (18 * H * K * F forward + backward):
  dense      one SwiGLU FFN with hidden K*F: no routing at all, the upper bound (ratio 1.0)
  deepspeed  deepspeed.moe.layer.MoE, top-2, drop_tokens=False (dropless, capacity = busiest
             expert), top2_2nd_expert_sampling=False, ep_size=1, gloo world of 1 (0.19.8 gathers
             tokens into an [E, C, H] buffer; older releases used a one-hot einsum dispatch)
  naive      for e in experts: idx = where(top-k == e); out[idx] += w * expert(x[idx])
  pikv       pikv.moe.create_moe('base', ...): sort-based dispatch, per-expert matmuls, combine
Opt-in what-if (same module and weights as pikv; pikv/ is not modified):
  pikv_grouped  GroupedExperts.use_grouped_mm = True: torch._grouped_mm, which has a CPU kernel,
                instead of the per-expert loop PiKV uses off CUDA
The MoE variants share one set of weights (router and experts) and are first checked to compute
the same output. Timing is pikv.benchmark's: the variants take turns run by run (rotating order),
so load from other processes on a shared machine falls on all of them alike; each time is the
median of --iters runs after --warmup. The whole set runs --rounds times, and round-to-round
change shows how much the load drifted.
ratio = dense_time / variant_time, the median of the per-run ratios (higher is better; 1.0 = as
fast as the dense FFN). Writes <out>/moe_layer.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed's run-time C++ builds go to a folder this repo owns (see /work/shared/ops/deepspeed-cpu.md).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pikv.benchmark import Transcript, machine_info, run_rounds, write_report  # noqa: E402
from pikv.moe import create_moe  # noqa: E402

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
VARIANTS = ("dense", "deepspeed", "naive", "pikv")
WHAT_IFS = ("pikv_grouped",)


class SwiGLU(nn.Module):
    """The one expert (and, with hidden K*F, the dense FFN): w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class NaiveMoE(nn.Module):
    """Softmax top-k (renormalised) router, then a Python loop over experts with where/index_add."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, ffn: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, ffn) for _ in range(num_experts))

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        probs_TE = torch.softmax(self.gate(x_TH).float(), dim=-1)
        w_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        w_TK = (w_TK / w_TK.sum(-1, keepdim=True)).to(x_TH.dtype)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids_TK == e)
            if tok.numel():
                out_TH = out_TH.index_add(0, tok, w_TK[tok, slot, None] * expert(x_TH[tok]))
        return out_TH


def _what_if(variant: str, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    assert variant == "pikv_grouped", variant

    def fn(x: torch.Tensor) -> torch.Tensor:
        saved, layer.experts.use_grouped_mm = layer.experts.use_grouped_mm, True
        try:
            return layer(x)  # the autograd graph is built here; backward needs no switch
        finally:
            layer.experts.use_grouped_mm = saved
    return fn


def _init_deepspeed() -> None:
    import deepspeed
    import logging
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # No shm comm op build (~1-2 min, and a lock file that hangs the next run if killed).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo")


def _deepspeed_moe(hidden: int, num_experts: int, top_k: int, ffn: int) -> nn.Module:
    from deepspeed.moe.layer import MoE
    kwargs = dict(num_experts=num_experts, ep_size=1, k=top_k, capacity_factor=1.0,
                  drop_tokens=False, use_rts=False)
    if "top2_2nd_expert_sampling" in MoE.__init__.__code__.co_varnames:
        kwargs["top2_2nd_expert_sampling"] = False  # no Gumbel noise on the 2nd choice
    layer = MoE(hidden, SwiGLU(hidden, ffn), **kwargs)
    layer.set_deepspeed_parallelism()
    return layer


@torch.no_grad()
def _share_weights(pikv: nn.Module, variant: str, module: nn.Module) -> None:
    """Copy PiKV's router and expert weights into the naive / DeepSpeed layer (nn.Linear is [out, in])."""
    ex = pikv.experts
    if variant == "naive":
        gate, experts = module.gate, module.experts
    else:
        gate, experts = module.deepspeed_moe.gate.wg, module.deepspeed_moe.experts.deepspeed_experts
    gate.weight.copy_(pikv.router.gate.weight)
    for e, expert in enumerate(experts):
        expert.w1.weight.copy_(ex.w1_EHF[e].T)
        expert.w3.weight.copy_(ex.w3_EHF[e].T)
        expert.w2.weight.copy_(ex.w2_EFH[e].T)


def build(variant: str, hidden: int, num_experts: int, top_k: int, ffn: int,
          pikv: Optional[nn.Module] = None) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(module, forward fn x_TH -> y_TH)."""
    if variant == "dense":
        m = SwiGLU(hidden, top_k * ffn)
        return m, m
    if variant == "pikv":
        m = create_moe("base", hidden, num_experts, top_k, ffn)
        return m, m
    if variant in WHAT_IFS:
        return pikv, _what_if(variant, pikv)
    m = NaiveMoE(hidden, num_experts, top_k, ffn) if variant == "naive" else \
        _deepspeed_moe(hidden, num_experts, top_k, ffn)
    if pikv is not None:
        _share_weights(pikv, variant, m)
    return m, (m if variant == "naive" else (lambda x: m(x)[0]))


def check_same_function(modules: dict, hidden: int) -> dict[str, float]:
    """Max |y - y_pikv| of each MoE variant on 512 tokens (shared weights)."""
    x = torch.randn(512, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = modules["pikv"][1](x)
        return {v: (fn(x) - ref).abs().max().item() for v, (_, fn) in modules.items()
                if v not in ("pikv", "dense")}


# Profiler op name -> category (forward and backward ops alike).
CATEGORIES = [
    ("expert/dense matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("gather/scatter (dispatch, combine)", ("aten::index_select", "aten::index_copy", "aten::index_add",
                                            "aten::index", "aten::index_put", "aten::scatter", "aten::gather",
                                            "aten::_index_put_impl_", "aten::embedding")),
    ("sort/top-k (router, dispatch)", ("aten::sort", "aten::argsort", "aten::topk", "aten::searchsorted")),
    ("cat/split/copies/zeros", ("aten::cat", "aten::split", "aten::split_with_sizes", "aten::copy_",
                                "aten::zero_", "aten::zeros", "aten::fill_", "aten::clone", "aten::contiguous",
                                "aten::new_zeros", "aten::empty", "aten::to", "aten::_to_copy")),
    ("SwiGLU and weighting elementwise", ("aten::silu", "aten::silu_backward", "aten::mul", "aten::add",
                                          "aten::add_", "aten::sum", "aten::div")),
]


def profile_pikv(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, iters: int) -> str:
    """Markdown: PiKV's forward stages and backward (timers), then op counts and self-time shares
    under torch.profiler (which slows this layer down several-fold: read its shares, not its ms)."""
    from torch.profiler import ProfilerActivity, profile
    from pikv.moe import losses

    # Forward stages, replaying MoELayer.forward step by step (grad mode on, as in training).
    stages: dict[str, list[float]] = {"router": [], "dispatch": [], "experts": [], "combine": [],
                                      "losses+metrics": []}
    for _ in range(iters):
        t = [time.perf_counter()]
        w, ids, logits, probs = module.router(x)
        t.append(time.perf_counter())
        x_NH, counts, state = module.dispatcher.dispatch(x, ids, module.num_experts, None)
        t.append(time.perf_counter())
        y_NH = module.experts(x_NH, counts)
        t.append(time.perf_counter())
        module.dispatcher.combine(y_NH, w, state)
        t.append(time.perf_counter())
        losses.load_balancing_loss(probs, ids), losses.z_loss(logits)
        losses.expert_counts(ids, module.num_experts), losses.router_entropy(probs.detach())
        t.append(time.perf_counter())
        for name, a, b in zip(stages, t, t[1:]):
            stages[name].append(b - a)
    step = time_shape({"pikv": (module, module)}, x, grad, 1, iters, baseline="pikv").median("pikv")
    fwd = {k: statistics.median(v) for k, v in stages.items()}
    lines = ["| part (timers, no profiler) | median ms | share of fwd+bwd |", "|---|---|---|"]
    lines += [f"| forward: {k} | {v * 1e3:.1f} | {v / step:.0%} |" for k, v in fwd.items()]
    bwd = step - sum(fwd.values())
    lines += [f"| backward (fwd+bwd minus forward) | {bwd * 1e3:.1f} | {bwd / step:.0%} |",
              f"| fwd+bwd | {step * 1e3:.1f} | 100% |"]

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            x.grad = None
            module(x).backward(grad)
    slowdown = (time.perf_counter() - t0) / iters / step
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_cat: dict[str, float] = {}
    for e in events:
        cat = next((c for c, names in CATEGORIES if e.key in names), "other")
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_cpu_time_total
    lines += ["", f"torch.profiler, fwd+bwd (ran {slowdown:.1f}x slower than unprofiled):", "",
              "| op category | share of self CPU time |", "|---|---|"]
    lines += [f"| {cat} | {us / total:.0%} |" for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    lines += ["", "| top op (self CPU) | calls / iter | share |", "|---|---|---|"]
    lines += [f"| {e.key} | {e.count / iters:.0f} | {e.self_cpu_time_total / total:.0%} |" for e in top]
    return "\n".join(lines)


def time_shape(mods: dict, x: torch.Tensor, grad: torch.Tensor, warmup: int, iters: int, baseline: str = "dense"):
    """pikv.benchmark.Timings of forward + backward (input gradient included) of every variant."""
    params = [p for module, _ in mods.values() for p in module.parameters()]

    def clear_grads() -> None:
        for p in params:
            p.grad = None
        x.grad = None

    cases = {v: (lambda fn=fn: fn(x).backward(grad)) for v, (_, fn) in mods.items()}
    return run_rounds(cases, rounds=iters, warmup=warmup, baseline=baseline, before_each=clear_grads)


def results_table(built: dict, timings: dict, rounds: int, flops_per_f: int) -> str:
    head = "| E x F | variant | " + " | ".join(f"round {r + 1} ms | round {r + 1} ratio"
                                             for r in range(rounds)) + " | GFLOP/s (last round) |"
    rows = [head, "|" + "---|" * (3 + 2 * rounds)]
    for (E, Fh), mods in built.items():
        for v in mods:
            cells = []
            for r in range(rounds):
                t = timings[(E, Fh, r)]
                cells += [f"{t.median(v) * 1e3:.1f}", f"{t.ratio(v, speedup=True)['median']:.2f}"]
            gflops = flops_per_f * Fh / timings[(E, Fh, rounds - 1)].median(v) / 1e9
            rows.append(f"| {E} x {Fh} | {v} | " + " | ".join(cells) + f" | {gflops:.0f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (default: all cores)")
    parser.add_argument("--tokens", type=int, default=4096, help="T")
    parser.add_argument("--hidden", type=int, default=512, help="H")
    parser.add_argument("--top-k", type=int, default=2, help="K")
    parser.add_argument("--shapes", default="8x1024,32x256", help="comma-separated ExF (experts x expert FFN hidden)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {VARIANTS + WHAT_IFS} (what-ifs are opt-in)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile PiKV's layer at each shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    torch.manual_seed(args.seed)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS + WHAT_IFS):
        parser.error(f"--variants: unknown {sorted(unknown)}; allowed: {', '.join(VARIANTS + WHAT_IFS)}")
    if "dense" not in variants:
        variants.insert(0, "dense")  # every ratio is relative to it
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    notes = []
    if "deepspeed" in variants and not HAS_DEEPSPEED:
        variants.remove("deepspeed")
        notes.append("deepspeed is not importable (pip install -e '.[deepspeed]'): its variant was skipped")
    if "deepspeed" in variants:
        try:
            _init_deepspeed()
        except Exception as err:  # noqa: BLE001 - a broken install must not stop the other variants
            variants.remove("deepspeed")
            notes.append(f"deepspeed failed to initialise ({type(err).__name__}: {err}): its variant was skipped")

    T, H, K = args.tokens, args.hidden, args.top_k
    emit = Transcript()
    emit(f"# MoE layer forward+backward, fp32, T={T} H={H} k={K}")
    for note in notes:
        emit(f"note: {note}")
    try:
        built = {}
        for E, Fh in shapes:
            mods = {}
            pikv = build("pikv", H, E, K, Fh)
            for v in variants:
                mods[v] = (pikv[0], pikv[1]) if v == "pikv" else build(v, H, E, K, Fh, pikv[0])
            if len(mods) > 2:
                diffs = check_same_function(mods, H)
                emit(f"E={E} F={Fh}: max |y - y_pikv| on shared weights: "
                     + ", ".join(f"{v} {d:.1e}" for v, d in diffs.items()))
            built[(E, Fh)] = mods
        x = torch.randn(T, H, requires_grad=True)
        grad = torch.randn(T, H)
        timings = {}  # (E, F, round) -> pikv.benchmark.Timings
        for r in range(args.rounds):
            for (E, Fh), mods in built.items():
                timings[(E, Fh, r)] = t = time_shape(mods, x, grad, args.warmup, args.iters)
                for v, ts in t.seconds.items():
                    print(f"  round {r + 1} E={E} F={Fh} {v}: median {t.median(v) * 1e3:.1f} ms "
                          f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})", flush=True)
        emit()
        emit(results_table(built, timings, args.rounds, 18 * T * H * K))  # 3 matmuls x 2 FLOPs x 3 (fwd + 2 bwd)
        emit(f"\nmedian of {args.iters} runs after {args.warmup} warmup, {args.rounds} rounds, variants "
             f"interleaved run by run")
        if args.profile:
            for (E, Fh), mods in built.items():
                emit(f"\n## PiKV profile, E={E} F={Fh}\n")
                emit(profile_pikv(mods["pikv"][0], x, grad, args.iters))
        data = {"args": vars(args), "notes": notes,
                "timings": {f"{E}x{Fh} round {r + 1}": t.summary(speedup=True) for (E, Fh, r), t in timings.items()}}
        _, md = write_report(args.out, "moe_layer", machine, data, emit.text)
        print(f"\nwrote {md}")
    finally:
        if "deepspeed" in variants:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
