"""What the jointly trained KV compressor adds to a training step of the default model.

  python bench/kv_train_step.py [--batch 16] [--rounds 5] [--threads 1] [--windows 0,8] [--ratio 4]

Forward + backward of the default model (pikv/config.py defaults, data.seq_len tokens per
sequence, random tokens) in each mode a training step can be in: the full cache only (a full-cache
co-training step, the same cost as a plain model's step), the distillation phase (the model on the
full cache plus the compressor's side attention through the latent), and co-training through the
latent (plus the full-cache distillation target), for each `kv.latent_window`. Modes are timed in
turn within every round (the machine is shared: interleaving keeps load drift out of the ratios);
reported: the median step time over rounds after the first and its ratio to the full-cache step.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pikv.config import load_config  # noqa: E402
from pikv.kv.learned import KVTrainState, latent_rank  # noqa: E402
from pikv.models import Transformer  # noqa: E402


def step_seconds(model, tokens, rank, through_latent) -> float:
    kv = KVTrainState.attach(model)
    kv.set(rank, through_latent)
    t0 = time.perf_counter()
    loss = model(tokens).float().logsumexp(-1).mean() + kv.pop_loss()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (the default job's per-process batch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", default="0,8", help="kv.latent_window values to compare")
    ap.add_argument("--ratio", type=float, default=4.0, help="the trained ratio whose rank is timed")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [])
    m = cfg.model
    tokens = torch.randint(0, m.vocab_size, (args.batch, cfg.data.seq_len))
    modes = {}
    for w in (int(x) for x in args.windows.split(",")):
        cfg.kv.latent_window = w
        model = Transformer(m, cfg.moe, kv_cfg=cfg.kv).train()
        rank = latent_rank(m.num_kv_heads, m.hidden_size // m.num_heads, args.ratio, cfg.kv.latent_bits, w,
                           cfg.data.seq_len)
        if not modes:
            modes["full cache"] = (model, None, True)
        modes[f"window {w}: distillation (rank {rank})"] = (model, rank, False)
        modes[f"window {w}: co-training (rank {rank})"] = (model, rank, True)
    times = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, (model, rank, through) in modes.items():
            times[name].append(step_seconds(model, tokens, rank, through))
    base = statistics.median(times["full cache"][1:])
    print(f"| mode | step (s, median of {args.rounds - 1}) | vs full cache |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts[1:])
        print(f"| {name} | {med:.3f} | {med / base:.2f}x |")
    print(f"batch {args.batch} x {cfg.data.seq_len} tokens, {args.threads} thread(s), load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
