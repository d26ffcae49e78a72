"""Decode tokens/s vs context length for the full cache and each KV policy (default tiny MoE model).

  python bench/kv_decode_speed.py [--contexts 1024,4096,16384] [--batch 1,8] [--threads 1]
      [--policies full,window,streaming,h2o,learned,quant] [--ratios 4,8] [--steps 16] [--repeats 5] [--out DIR]
      [--rotary-fraction 1.0]
  python bench/kv_decode_speed.py --contexts 64 --batch 1 --ratios 4 --steps 2 --repeats 2   # quickest check
  python bench/kv_decode_speed.py --policies full,quant --dequantized   # + each quant method's old path
  python bench/kv_decode_speed.py --policies full,quant,learned --torch-path  # + the torch paths instead of the C++ kernels
  python bench/kv_decode_speed.py --policies full,quant --portable-kernel  # + the kernel's portable build

The model is the default configuration (pikv/config/) with max_seq_len raised to the longest
context (model.rotary_fraction = --rotary-fraction, default the model's 0.5: below 1 the learned latent
is the decoupled one with absorbed decode attention, pikv/kv/mla.py; 1.0 gives the joint latent), random weights (speed does not depend on them). The cache of each method is filled to
the context length by feeding random keys/values through `KVCache.attend` layer by layer in
chunks (the prefill's MoE/FFN work is skipped: it is the same for every method and is not what
is measured), then `--steps` real decode steps of the whole model are timed. The "no-attention
floor" row is a decode step over a 1-token cache: the FFN/MoE + projections share of a step,
which bounds what any KV policy can gain. Writes <out>/kv_decode_speed.{json,md}.

For each (batch, context) every method's cache is built first, then pikv.benchmark runs one warm-up
round and `--repeats` rounds, each timing `--steps` decode steps of every method in turn (rotating
order), so a burst of load on this shared machine hits all methods of a round alike; the table
gives the median tokens/s and the median of the per-round speed-up vs the full cache.
--dequantized also times every quantized method through dequantize-then-attend (`Store.attend`,
the path before the stores attended in their compressed domain) on a copy of the same filled cache,
as "METHOD (dequantized)". --torch-path likewise times every quantized or decoupled-latent method
with the fused C++ decode kernel switched off (`fused_kernel = False`: the torch blockwise
compressed-domain path of the quantized stores, the torch absorbed attention of pikv/kv/mla.py) as
"METHOD (torch path)". --portable-kernel times them through the kernel's portable build instead of
its AVX-512 one (`fused_simd = False`: the -DPIKV_NO_SIMD build, pikv/kv/kernels) as "METHOD (portable
kernel)".
Threads: use at most the idle cores. With 2 OpenMP threads on a 2-core machine that also runs
something else, a decode step took ~28 ms instead of ~3 ms (measured): the threads spin-wait for
a core, which swamps everything this benchmark measures.
"""

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pikv.benchmark import machine_info, run_rounds, write_report  # noqa: E402
from pikv.config import KVConfig, ModelConfig, MoEConfig  # noqa: E402
from pikv.kv import make_cache  # noqa: E402
from pikv.models import Transformer  # noqa: E402


@torch.no_grad()
def fill(model, cache, B: int, S: int, chunk: int = 512) -> None:
    """Bring every layer's cache to S appended tokens with random post-/pre-RoPE keys and values."""
    cfg = model.cfg
    N, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads
    g = torch.Generator().manual_seed(0)
    for start in range(0, S, chunk):
        T = min(chunk, S - start)
        for li in range(cfg.num_layers):
            q = torch.randn(B, N, T, D, generator=g)
            k = torch.randn(B, G, T, D, generator=g)
            v = torch.randn(B, G, T, D, generator=g)
            cache.attend(li, q, k, v, k_pre_BGTD=k, rope=model.rope, start=start)
    assert cache.seq_len == S


def decode(model, cache, B: int, steps: int):
    """`steps` decode steps of the whole model on `cache` (each appends one token per sequence)."""
    tok = torch.zeros(B, 1, dtype=torch.long)

    @torch.no_grad()
    def run() -> None:
        for _ in range(steps):
            model(tok, cache)
    return run


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--policies", default="full,window,streaming,h2o,learned,quant")
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default OMP_NUM_THREADS, else 1)")
    ap.add_argument("--rotary-fraction", type=float, default=ModelConfig.rotary_fraction,
                    help="model.rotary_fraction (< 1: the decoupled latent, absorbed attention)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--dequantized", action="store_true",
                    help="also time each quantized method through dequantize-then-attend (its old path)")
    ap.add_argument("--torch-path", action="store_true",
                    help="also time each quantized / decoupled-latent method without the fused C++ decode kernel "
                         "(its torch path)")
    ap.add_argument("--portable-kernel", action="store_true",
                    help="also time each quantized / decoupled-latent method through the kernel's portable (non-SIMD) "
                         "build")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.manual_seed(0)
    machine = machine_info()
    cfg = ModelConfig(max_seq_len=max(contexts) + args.steps * (args.repeats + 1) + 2,
                      rotary_fraction=args.rotary_fraction)
    model = Transformer(cfg, MoEConfig(), kv_cfg=KVConfig(compressor="learned")).eval()
    rows = []
    for B in batches:
        for S in [1] + contexts:  # context 1: the no-attention floor
            methods = {}
            for policy in (["full"] if S == 1 else args.policies.split(",")):
                for ratio in ([None] if policy == "full" else ratios):
                    try:
                        cache = make_cache(policy, model, ratio=ratio, total_tokens=S)
                    except ValueError as err:
                        rows.append({"batch": B, "context": S, "policy": policy, "ratio": ratio, "skipped": str(err)})
                        continue
                    fill(model, cache, B, S)
                    methods[(policy, ratio)] = cache
                    variants = {"dequantized": ("compressed_attention", args.dequantized),
                                "torch path": ("fused_kernel", args.torch_path),
                                "portable kernel": ("fused_simd", args.portable_kernel)}
                    for label, (switch, wanted) in variants.items():
                        if wanted and hasattr(cache.stores[0], switch):
                            old = copy.deepcopy(cache)
                            for store in old.stores:
                                setattr(store, switch, False)
                            methods[(f"{policy} ({label})", ratio)] = old
            if not methods:
                continue
            has_full = ("full", None) in methods
            timings = run_rounds({m: decode(model, cache, B, args.steps) for m, cache in methods.items()},
                                 rounds=args.repeats, warmup=1, baseline=("full", None) if has_full else None)
            for (policy, ratio), seconds in timings.seconds.items():
                tps = [B * args.steps / t for t in seconds]
                speedup = timings.ratio((policy, ratio), speedup=True)
                rows.append({"batch": B, "context": S, "policy": "no-attention floor" if S == 1 else policy,
                             "ratio": ratio, "tokens_per_s": statistics.median(tps), "tokens_per_s_rounds": tps,
                             "speedup_vs_full": speedup["median"] if has_full else None,
                             "speedup_interval": [speedup["low"], speedup["high"], speedup["coverage"]],
                             "kv_bytes": methods[(policy, ratio)].nbytes()})
                print(rows[-1], flush=True)
            del methods
    floor = {r["batch"]: r["tokens_per_s"] for r in rows if r["context"] == 1}
    lines = ["| batch | context | policy | ratio | decode tok/s (median) | speed-up vs full (median of rounds) "
             "| full / floor |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or r["context"] == 1:
            continue
        share = f"{r['tokens_per_s'] / floor[r['batch']]:.2f}" if r["policy"] == "full" else ""
        lines.append(f"| {r['batch']} | {r['context']} | {r['policy']} | {r['ratio'] or ''} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup_vs_full']:.2f}x | {share} |")
    lines += ["", "no-attention floor (decode over a 1-token cache): "
              + ", ".join(f"batch {b}: {t:.1f} tok/s" for b, t in floor.items())]
    meta = {"threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats,
            "rotary_fraction": args.rotary_fraction}
    _, md = write_report(args.out, "kv_decode_speed", machine, {**meta, "rows": rows}, "\n".join(lines))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
