"""PiKV's KV policies and NVIDIA kvpress presses on the same model and text (bench/kv_vs_kvpress.py).

Protocol (kvpress's): prefill the context with compression, then score the continuation in one
teacher-forced pass over the compressed cache (generated tokens are not evicted). kvpress runs on
the HF model (eager attention, DynamicCache); PiKV's policies on the same weights loaded into a
pikv Transformer (`pikv.eval.hf_llama`) with `KVOptions(prefill_only=True)`. Needs kvpress and
transformers (the `anchors` extra) only when the HF side runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pikv.eval.kv import bootstrap_ci
from pikv.kv import KVOptions, make_cache, parse_method

KVPRESS = {"ObservedAttention (H2O)": "ObservedAttentionPress", "SnapKV": "SnapKVPress",
           "PyramidKV": "PyramidKVPress", "StreamingLLM": "StreamingLLMPress",
           "ExpectedAttention": "ExpectedAttentionPress", "TOVA": "TOVAPress", "Knorm": "KnormPress"}
# `quant` picks its bits and fp16 residual for the ratio (pikv.kv.budgets.quant_plan);
# `quant:R` forces a residual of R tokens (its measured ratio may then miss the requested one; before
# the storage x selection names, whose `@` is a storage share, this bench spelled it `quant@R`).
PIKV = ["h2o", "snapkv", "streaming", "pyramid", "window", "quant"]


def nll_of(logits_TV: torch.Tensor, targets_T: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits_TV.float(), targets_T, reduction="mean"))


@torch.no_grad()
def run_hf(model, seq_N, ctx: int, press=None) -> tuple[float, float, int]:
    """kvpress protocol: (mean NLL of the continuation, kept context tokens per layer, 0: no byte count)."""
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
def run_pikv(model, seq_N, ctx: int, policy: str, ratio: float) -> tuple[float, float, int]:
    """(NLL, kept context tokens in layer 0, peak nbytes() of the cache)."""
    name, _, residual = policy.partition(":")
    method = parse_method(name)
    if method.selection == "all":  # holds every token: the ratio is over the whole sequence
        cache = make_cache(name, model, ratio=None if name == "full" else ratio, total_tokens=seq_N.shape[0],
                           options=KVOptions(quant_residual=int(residual) if residual else None))
    else:  # kvpress compresses the prompt: the budget (split with a storage) and pyramid's length are the context
        cache = make_cache(name, model, ratio=ratio, total_tokens=ctx, options=KVOptions(prefill_only=True))
    first = model(seq_N[None, :ctx], cache)[:, -1:]
    kept = cache.length(0) if method.selection != "all" else ctx
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
                       options=KVOptions(prefill_only=True))
    ours(c, cache)
    agree = []
    for li, (fl, pl) in enumerate(zip(full.layers, pressed.layers)):
        # kvpress gathers exact rows of the full keys: recover their positions by equality
        match = (pl.keys[0][:, :, None, :] == fl.keys[0][:, None, :, :]).all(-1)  # [G, M, S]
        theirs = [set(match[g].float().argmax(-1).tolist()) for g in range(match.shape[0])]
        mine = [set(cache.positions(li)[0, g].tolist()) for g in range(match.shape[0])]
        agree += [len(a & b) / max(1, len(a)) for a, b in zip(theirs, mine)]
    return float(np.mean(agree))


Key = tuple[str, str, float]  # (library, method, ratio); (library, "full", 1.0) is each side's reference


def comparison_rows(nll: dict[Key, list[float]], kept: dict[Key, list[float]],
                    peak: dict[Key, list[int]]) -> list[dict]:
    """Per method: mean NLL, extra perplexity vs its own library's full cache on the same sequences
    (paired per sequence, bootstrap 95% interval), kept tokens; for `quant` rows the measured
    compression ratio (peak bytes of PiKV's fp16 full cache / the method's)."""
    rows = []
    for (lib, name, r), vals in nll.items():
        d = np.array(vals) - np.array(nll[(lib, "full", 1.0)])
        ci = bootstrap_ci(d)
        rows.append({"library": lib, "method": name, "ratio": r, "nll": float(np.mean(vals)),
                     "ppl_change_pct": 100 * (math.exp(d.mean()) - 1),
                     "ppl_change_ci95_pct": [100 * (math.exp(c) - 1) for c in ci],
                     "kept_context_tokens": float(np.mean(kept[(lib, name, r)]))})
        if lib == "pikv" and name.startswith("quant"):  # holds the whole sequence: scales and zero
            # points counted (eviction rows report kept tokens instead)
            rows[-1]["measured_ratio"] = float(np.mean(np.array(peak[("pikv", "full", 1.0)]) /
                                                       np.array(peak[(lib, name, r)])))
    return rows


def comparison_markdown(rows: list[dict], agreement: dict[str, float]) -> str:
    lines = ["| library | method | ratio | kept context tokens (mean per layer) | measured ratio (bytes) | NLL | "
             "extra perplexity % [95% CI] |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        measured = f"{x['measured_ratio']:.2f}" if "measured_ratio" in x else ""
        lo, hi = x["ppl_change_ci95_pct"]
        lines.append(f"| {x['library']} | {x['method']} | {x['ratio']:g} | {x['kept_context_tokens']:.1f} | "
                     f"{measured} | {x['nll']:.4f} | {x['ppl_change_pct']:+.1f} [{lo:+.1f}, {hi:+.1f}] |")
    lines += ["", "Kept context positions, first sequence (share of kvpress's kept positions PiKV keeps too):"]
    lines += [f"- {k}: {100 * v:.2f}%" for k, v in agreement.items()]
    return "\n".join(lines) + "\n"
