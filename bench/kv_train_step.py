"""What the jointly trained KV compressor adds to a training step of the default model.

  python bench/kv_train_step.py [--batch 16] [--rounds 4] [--warmup 1] [--threads 1] [--windows 0,8]
      [--ratio 4] [--out runs/bench]
  python bench/kv_train_step.py --batch 1 --seq-len 64 --rounds 2 --warmup 0   # quickest end-to-end check

Forward + backward of the default model (pikv/config/ defaults, data.seq_len tokens per
sequence, random tokens) in each mode a training step can be in: the full cache only (a full-cache
co-training step, the same cost as a plain model's step), the distillation phase (the model on the
full cache plus the compressor's side attention through the latent), and co-training through the
latent (plus the full-cache distillation target), for each `kv.latent_window`. pikv.benchmark runs
the modes in turn within every round (the machine is shared: interleaving keeps load drift out of
the ratios) after --warmup discarded rounds; reported: the median step time over rounds and the
median of the per-round ratios to the full-cache step with their interval. Writes
<out>/kv_train_step.{json,md}.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pikv.benchmark import machine_info, run_rounds, write_report  # noqa: E402
from pikv.config import load_config  # noqa: E402
from pikv.kv.learned import KVTrainState, latent_rank  # noqa: E402
from pikv.models import Transformer  # noqa: E402


def train_step(model, tokens, rank, through_latent):
    """One forward + backward in the given compressor mode (gradients dropped afterwards)."""
    def step() -> None:
        kv = KVTrainState.attach(model)  # per call: several modes share one model
        kv.set(rank, through_latent)
        loss = model(tokens).float().logsumexp(-1).mean() + kv.pop_loss()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (the default job's per-process batch)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds before them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", default="0,8", help="kv.latent_window values to compare")
    ap.add_argument("--ratio", type=float, default=4.0, help="the trained ratio whose rank is timed")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    cfg = load_config(None, [])
    m = cfg.model
    seq_len = args.seq_len or cfg.data.seq_len
    tokens = torch.randint(0, m.vocab_size, (args.batch, seq_len))
    modes = {}
    for w in (int(x) for x in args.windows.split(",")):
        cfg.kv.latent_window = w
        model = Transformer(m, cfg.moe, kv_cfg=cfg.kv).train()
        rank = latent_rank(m.num_kv_heads, m.hidden_size // m.num_heads, args.ratio, cfg.kv.latent_bits, w, seq_len)
        if not modes:
            modes["full cache"] = train_step(model, tokens, None, True)
        modes[f"window {w}: distillation (rank {rank})"] = train_step(model, tokens, rank, False)
        modes[f"window {w}: co-training (rank {rank})"] = train_step(model, tokens, rank, True)
    timings = run_rounds(modes, rounds=args.rounds, warmup=args.warmup, baseline="full cache")
    table = timings.markdown(unit="s", label="mode")
    note = f"batch {args.batch} x {seq_len} tokens, {args.threads} thread(s), random tokens, default model\n"
    _, md = write_report(args.out, "kv_train_step", machine, {"args": vars(args), "modes": timings.summary()},
                         table + "\n" + note, title="KV compressor: training step cost")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
