"""Distillation evidence (issue 6): a dense teacher, then three MoE students at equal steps/tokens.

  (a) scratch   the student MoE (plain experts, everything trained) from a random init
  (b) upcycled  LoRA experts upcycled from the teacher (frozen bases), LM loss only
  (c) distilled as (b), with train.mode=distill from the teacher

Every run is a real `train/main.py` job on the embedded corpus (one process); each student runs
for every seed. Each is scored on the held-out plays: bits/byte and the mean per-token
KL(teacher || student) at T = 1. Writes <out>/distill_compare.{json,md}.

  nice python bench/distill_compare.py --out runs/distill_compare
  python bench/distill_compare.py --teacher-steps 4 --student-steps 2 --seeds 0 --out /tmp/dc   # quickest check

The report (pikv.benchmark.write_report) also records the machine, its load and the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pikv.benchmark import machine_info, write_report  # noqa: E402
from pikv.config import load_config  # noqa: E402
from pikv.data import iter_eval_batches, prepare_data  # noqa: E402
from pikv.training.distill import load_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A trunk small enough for a 2-core CPU; the teacher's FFN width equals the expert width so the
# experts can start as the teacher's FFN. top_k=1: the student's active FLOPs per token equal the
# teacher's; the teacher gets `--teacher-steps` (more training compute) instead of more width.
MODEL = ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=256", "model.expert_ffn_hidden_size=256", "model.num_experts=4", "model.top_k=1",
         "model.max_seq_len=128", "data.seq_len=128", "train.batch_size=16", "train.eval_every=100000",
         "train.checkpoint_every=100000", "logging.wandb_mode=disabled", "logging.progress=false",
         "logging.log_every=10", "kv.compressor=none"]  # the MoE alone: no jointly trained KV latent
STUDENTS = {
    "a_scratch": ["moe.kind=base"],
    "b_upcycled_lora": ["moe.kind=pikv", "train.init_from={teacher}"],
    "c_upcycled_lora_distill": ["moe.kind=pikv", "train.init_from={teacher}", "train.mode=distill",
                                "distill.teacher={teacher}"],
}


def train(out: Path, name: str, overrides: list[str]) -> float:
    start = time.time()
    cmd = [sys.executable, str(REPO / "train" / "main.py"), f"train.output_dir={out}", f"train.run_name={name}",
           "train.resume=never", *MODEL, *overrides]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return time.time() - start


@torch.no_grad()
def score(run_dir: Path, teacher: torch.nn.Module, heldout, byte_lengths, seq_len: int) -> dict:
    """Held-out bits/byte (nats / ln 2 / UTF-8 bytes of the targets) and
    mean KL(teacher || student) per token, in one pass over the split."""
    model, _ = load_teacher(run_dir)  # any PiKV checkpoint: rebuilt from its config, frozen
    bytes_V = torch.as_tensor(byte_lengths, dtype=torch.float64)
    nats = kl = n_bytes = 0.0
    tokens = 0
    for inputs_BT, targets_BT in iter_eval_batches(heldout, seq_len, 16):
        s_logp = F.log_softmax(model(inputs_BT).flatten(0, 1).float(), -1)
        t_logp = F.log_softmax(teacher(inputs_BT).flatten(0, 1).float(), -1)
        nats += F.nll_loss(s_logp, targets_BT.flatten(), reduction="sum").item()
        kl += F.kl_div(s_logp, t_logp, log_target=True, reduction="sum").item()
        n_bytes += bytes_V[targets_BT].sum().item()
        tokens += targets_BT.numel()
    return {"bits_per_byte": nats / math.log(2) / n_bytes, "kl_to_teacher": kl / tokens, "heldout_tokens": tokens}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/distill_compare")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--teacher", default=None, help="an existing teacher run directory (skips training it)")
    parser.add_argument("--distill", nargs="*", default=["distill.weight=0.5", "distill.temperature=2.0"],
                        help="distill.* overrides for student (c)")
    args = parser.parse_args(argv)
    machine = machine_info()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    if args.teacher is None:
        timings["teacher"] = train(out, "teacher", [f"train.max_steps={args.teacher_steps}", "moe.every_n_layers=0",
                                                    f"train.warmup_steps={args.teacher_steps // 10}"])
    teacher_dir = Path(args.teacher).resolve() if args.teacher else out / "teacher"
    cfg = load_config(None, MODEL)
    data = prepare_data(cfg, None, True, lambda: None)
    heldout = data.tokens["heldout"]
    teacher, _ = load_teacher(teacher_dir)
    results: dict[str, list[dict]] = {"teacher": [score(teacher_dir, teacher, heldout, data.byte_lengths,
                                                        cfg.data.seq_len)]}
    for seed in args.seeds:
        for name, extra in STUDENTS.items():
            overrides = [o.format(teacher=teacher_dir) for o in extra] + [
                f"train.seed={seed}", f"train.max_steps={args.student_steps}", f"train.lr={args.student_lr}",
                f"train.warmup_steps={args.student_steps // 10}"]
            if name.endswith("distill"):
                overrides += args.distill
            run = f"{name}_seed{seed}"
            timings[run] = train(out, run, overrides)
            row = score(out / run, teacher, heldout, data.byte_lengths, cfg.data.seq_len)
            summary = json.loads((out / run / "model_summary.json").read_text())
            row |= {"seed": seed, "trainable_params": summary["num_trainable_params"],
                    "total_params": summary["num_params"]}
            results.setdefault(name, []).append(row)
            print(f"{run}: {row} ({timings[run]:.0f} s)", flush=True)
    report = {"args": vars(args), "model": MODEL, "results": results, "seconds": timings,
              "tokens_per_student": args.student_steps * 16 * cfg.data.seq_len}
    lines = ["| model | held-out bits/byte (per seed) | mean | KL(teacher \\|\\| student) nats/token (per seed) | mean "
             "| trainable / total params |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        bpb, kl = [r["bits_per_byte"] for r in rows], [r["kl_to_teacher"] for r in rows]
        params = f"{rows[0]['trainable_params']:,} / {rows[0]['total_params']:,}" if "total_params" in rows[0] else "-"
        lines.append(f"| {name} | {', '.join(f'{v:.4f}' for v in bpb)} | {statistics.mean(bpb):.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in kl)} | {statistics.mean(kl):.4f} | {params} |")
    write_report(out, "distill_compare", machine, report, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
