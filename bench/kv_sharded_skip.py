"""Shard-skipping (sharded Quest) on held-out text: the fraction of KV bytes each rank reads per
decode step, the (layer, step) reads a rank skips entirely, and the NLL against exact sharded
attention (the sharded full cache) and single-process Quest.

  OMP_NUM_THREADS=1 python bench/kv_sharded_skip.py --checkpoint RUN/checkpoints/step_N
      [--world 2] [--budgets 32,64] [--sequences 16] [--batch 8] [--out DIR]

Held-out windows of the run's data (seq_len tokens, pikv.eval.kv.heldout_sequences), the first
half as the prompt, then teacher-forced decoding (pikv.eval.decode) of the rest; NLL in nats per
scored token, per window; ΔNLL paired per window with a bootstrap 95% interval over windows. Quest (`make_cache("quest", tokens=BUDGET)`) reads BUDGET / 16 pages of 16 tokens
per kv head and step plus the current page; sharded, every rank bounds every page and reads its
tokens in the chosen pages only (pikv/kv/sharded.py). Bytes: KV read / KV a full read would touch,
per rank, over all decode steps and layers; page bounds (read by every rank) given apart.
Writes <out>/kv_sharded_skip.{json,md}.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pikv.benchmark import machine_info, write_report  # noqa: E402
from pikv.data import load_tokenizer  # noqa: E402
from pikv.eval.decode import decode_logprobs  # noqa: E402
from pikv.eval.kv import heldout_sequences  # noqa: E402
from pikv.eval.stats import bootstrap_ci  # noqa: E402
from pikv.kv import make_cache  # noqa: E402
from pikv.models import Transformer  # noqa: E402
from pikv.testing import run_distributed  # noqa: E402
from pikv.training.checkpoint import load_model_weights, read_trainer_state, resolve_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.eval import run_data, stored_config  # noqa: E402


def nll_and_reads(model, seq_XN, prefill: int, batch: int, policy: str, tokens, group) -> dict:
    """NLL per window (mean over its tokens prefill..) under `policy`, and this rank's read counters."""
    nll, reads = [], {"read": 0, "bounds": 0, "full": 0, "skipped": 0, "steps": 0}
    for i in range(0, seq_XN.shape[0], batch):
        seq = seq_XN[i:i + batch]
        cache = make_cache(policy, model, tokens=tokens, total_tokens=seq.shape[1], shard_group=group)
        logp_BCV, _ = decode_logprobs(model, seq, prefill, cache)
        nll += (-logp_BCV.gather(-1, seq[:, prefill:, None])[..., 0].double().mean(1)).tolist()
        reads["read"] += cache.bytes_read
        reads["bounds"] += getattr(cache, "bounds_bytes_read", 0)
        reads["full"] += getattr(cache, "full_bytes_read", 0)
        reads["skipped"] += getattr(cache, "skipped_reads", 0)
        reads["steps"] += cache.decode_steps * cache.num_layers
    return {"nll": nll, **reads}


def _worker(rank, world, model, seq_XN, prefill, batch, budgets):
    group = dist.group.WORLD
    out = {"full": nll_and_reads(model, seq_XN, prefill, batch, "full", None, group)}
    for M in budgets:
        out[M] = nll_and_reads(model, seq_XN, prefill, batch, "quest", M, group)
    return out


def table(single: dict, ranks: list, budgets: list, world: int) -> str:
    """Mean NLL per window; ΔNLL paired per window against exact sharded attention, with its
    bootstrap 95% interval over windows."""
    full = np.array(ranks[0]["full"]["nll"])
    lines = [f"| Quest budget (tokens) | NLL sharded | ΔNLL vs exact sharded [95% CI] | NLL 1 process | KV bytes read "
             f"/ full read, per rank | + page bounds | reads skipped per rank |", "|---|---|---|---|---|---|---|"]
    lines.append(f"| exact (full, {world} ranks) | {full.mean():.4f} | 0 | {np.mean(single['full']):.4f} | 1 | | |")
    for M in budgets:
        rows = [r[M] for r in ranks]
        d = np.array(rows[0]["nll"]) - full
        lo, hi = bootstrap_ci(d)
        kv = ", ".join(f"{(r['read'] - r['bounds']) / r['full']:.3f}" for r in rows)
        bounds = ", ".join(f"{r['bounds'] / r['full']:.3f}" for r in rows)
        skipped = ", ".join(f"{r['skipped'] / r['steps']:.3f}" for r in rows)
        lines.append(f"| {M} | {np.mean(rows[0]['nll']):.4f} | {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] | "
                     f"{np.mean(single[M]):.4f} | {kv} | {bounds} | {skipped} |")
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--budgets", default="32,64")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    machine = machine_info()
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg = stored_config(ckpt, read_trainer_state(ckpt))
    model = Transformer(cfg.model, cfg.moe, kv_cfg=cfg.kv).eval()
    load_model_weights(ckpt, model)
    seq_XN = heldout_sequences(load_tokenizer(str(ckpt / "tokenizer.json")), run_data(cfg).documents("heldout"),
                               cfg.data.seq_len, args.sequences)
    prefill, budgets = seq_XN.shape[1] // 2, [int(b) for b in args.budgets.split(",")]
    single = {"full": nll_and_reads(model, seq_XN, prefill, args.batch, "full", None, None)["nll"]}
    single.update({M: nll_and_reads(model, seq_XN, prefill, args.batch, "quest", M, None)["nll"] for M in budgets})
    ranks = run_distributed(_worker, args.world, model, seq_XN, prefill, args.batch, budgets, timeout_s=24 * 3600)
    md = table(single, ranks, budgets, args.world)
    meta = {"checkpoint": str(ckpt), "sequences": seq_XN.shape[0], "length": seq_XN.shape[1], "prefill": prefill,
            "world": args.world, "single": single, "ranks": ranks}
    _, path = write_report(args.out, "kv_sharded_skip", machine, meta, md)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
