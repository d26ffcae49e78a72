"""One layer's decode attention over a quantized store: the fused kernel's AVX-512 build, its
portable build (-DPIKV_NO_SIMD) and the full cache's cast + SDPA on the same shapes.

  python bench/kv_kernel_micro.py [--contexts 8192,16384] [--batch 1,4] [--rounds 7] [--calls 10]

Shapes are the default model's (6 query heads, 2 kv heads, head dim 32). Stores: KIVI 2-bit (group
32, 128-token fp16 residual: `quant` at 4x) and per-token 4-bit codes (group 32: the storage of the
8x compositions), the latter also with the probabilities returned (what H2O asks for). Each case
times `--calls` calls of `store.attend` for one query token per sequence (the Python around the op
included); the rounds rotate the cases (pikv.benchmark), the table gives the median per call and
the median of the per-round ratios against the full cache. Timer: the CPU time of this thread
(time.thread_time; 1 torch thread, so all of a case's work), not the wall clock: on the shared,
loaded 2-core machine the wall clock also counts the time slices other processes take, which
moved A/B ratios of identical code by +-30%; the CPU time kept them within ~5% (measured). The
whole-model numbers are bench/kv_decode_speed.py's (wall clock); this isolates the kernel.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pikv.benchmark import run_rounds  # noqa: E402
from pikv.kv import kernels  # noqa: E402
from pikv.kv.attention import attention  # noqa: E402
from pikv.kv.quant import KiviStore, TokenQuantStore  # noqa: E402

N, G, D = 6, 2, 32


def filled(store, k, v):
    store.append(k, k, v)
    store.settle()
    return store


def cases(B: int, S: int, calls: int):
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, G, S, D, generator=gen), torch.randn(B, G, S, D, generator=gen)
    q = torch.randn(B, N, 1, D, generator=gen)
    k16, v16 = k.half(), v.half()
    stores = {"kivi 2-bit": filled(KiviStore(2, 32, 128), k, v),
              "token 4-bit": filled(TokenQuantStore(4, 32, None, 256, S), k, v)}

    def full():
        for _ in range(calls):
            attention(q, k16, v16, None, False)

    def fused(store, simd, need_probs):
        def run():
            store.fused_simd = simd
            for _ in range(calls):
                store.attend(q, None, 0, S - 1, 1, None, need_probs)
        return run

    out = {"full (cast + SDPA)": full}
    for name, store in stores.items():
        for probs in ([False, True] if name.startswith("token") else [False]):
            label = name + (" + probs" if probs else "")
            out[f"{label} portable"] = fused(store, False, probs)
            out[f"{label} simd"] = fused(store, True, probs)
    return out


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,16384")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if kernels.quant_decode("simd") is None or kernels.quant_decode("portable") is None:
        raise SystemExit(f"the kernel cannot be built here: {kernels.reason('simd') or kernels.reason('portable')}")
    print("| batch | context | case | ms per call (median) | speed-up vs full (median of rounds) |")
    print("|---|---|---|---|---|")
    for B in [int(b) for b in args.batch.split(",")]:
        for S in [int(c) for c in args.contexts.split(",")]:
            with torch.no_grad():
                timings = run_rounds(cases(B, S, args.calls), rounds=args.rounds, warmup=1, timer=time.thread_time)
            for name in timings.seconds:
                ms = timings.median(name) / args.calls * 1e3
                print(f"| {B} | {S} | {name} | {ms:.3f} | {timings.ratio(name, speedup=True)['median']:.2f}x |",
                      flush=True)
    print(f"\nAVX-512 tiles taken [token keys, KIVI keys, values]: {kernels.simd_tiles()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
