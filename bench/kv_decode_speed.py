"""Decode tokens/s vs context length for the full cache and each KV policy (default tiny MoE model).

  OMP_NUM_THREADS=2 python bench/kv_decode_speed.py [--contexts 1024,4096,16384] [--batch 1,8]
      [--policies full,window,streaming,h2o,learned,quant] [--ratios 4,8] [--steps 16] [--out DIR]

The model is the default configuration (pikv/config.py) with max_seq_len raised to the longest
context, random weights (speed does not depend on them). The cache of each method is filled to
the context length by feeding random keys/values through `PolicyCache.attend` layer by layer in
chunks (the prefill's MoE/FFN work is skipped: it is the same for every method and is not what
is measured), then `--steps` real decode steps of the whole model are timed. The "no-attention
floor" row is a decode step over a 1-token cache: the FFN/MoE + projections share of a step,
which bounds what any KV policy can gain. Writes <out>/kv_decode_speed.{json,md}.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
        for li, block in enumerate(model.layers):
            q = torch.randn(B, N, T, D, generator=g)
            k = torch.randn(B, G, T, D, generator=g)
            v = torch.randn(B, G, T, D, generator=g)
            cache.attend(li, q, k, v, k_pre_BGTD=k, rope=model.rope, start=start, module=block.self_attn)
    assert cache.seq_len == S


@torch.no_grad()
def decode_speed(model, cache, B: int, steps: int) -> float:
    tok = torch.zeros(B, 1, dtype=torch.long)
    model(tok, cache)  # warm-up step
    t0 = time.perf_counter()
    for _ in range(steps):
        model(tok, cache)
    return B * steps / (time.perf_counter() - t0)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--policies", default="full,window,streaming,h2o,learned,quant")
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=max(contexts) + args.steps + 2)
    model = Transformer(cfg, MoEConfig(), kv_cfg=KVConfig(compressor="learned")).eval()
    rows = []
    for B in batches:
        floor = make_cache("full", model)
        fill(model, floor, B, 1)
        rows.append({"batch": B, "context": 1, "policy": "no-attention floor", "ratio": None,
                     "tokens_per_s": decode_speed(model, floor, B, args.steps)})
        print(rows[-1], flush=True)
        for S in contexts:
            for policy in args.policies.split(","):
                for ratio in ([1.0] if policy == "full" else ratios):
                    try:
                        cache = make_cache(policy, model, ratio=None if policy == "full" else ratio,
                                           total_tokens=S)
                    except ValueError as err:
                        rows.append({"batch": B, "context": S, "policy": policy, "ratio": ratio, "skipped": str(err)})
                        continue
                    fill(model, cache, B, S)
                    tps = decode_speed(model, cache, B, args.steps)
                    rows.append({"batch": B, "context": S, "policy": policy, "ratio": ratio, "tokens_per_s": tps,
                                 "kv_bytes": cache.nbytes()})
                    print(rows[-1], flush=True)
                    del cache
    full = {(r["batch"], r["context"]): r["tokens_per_s"] for r in rows if r["policy"] == "full"}
    lines = ["| batch | context | policy | ratio | decode tok/s | speed-up vs full |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            continue
        base = full.get((r["batch"], r["context"]))
        up = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['batch']} | {r['context']} | {r['policy']} | {r['ratio'] or ''} | "
                     f"{r['tokens_per_s']:.1f} | {up} |")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "steps": args.steps}
    (args.out / "kv_decode_speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (args.out / "kv_decode_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
