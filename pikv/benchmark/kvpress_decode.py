"""NVIDIA kvpress presses under PiKV's decoding protocol, as rows of PiKV's KV evaluation.

Protocol (pikv/eval/kv.py): prefill P tokens, then teacher-forced decoding one token at a time
with the budget enforced after every step. kvpress does that with `PrefillDecodingPress`: the
press compresses the prompt to M tokens per layer, and `DecodingPress(compression_interval=1,
target_size=M)` compresses back to M after every decoded token (kvpress 0.5.5,
presses/decoding_press.py). The HF model runs with eager attention (ObservedAttention needs the
weights); its own full cache decodes the same windows as the reference of ΔNLL, KL and top-1.
The Pareto table's best-minus-press differences compare per-window NLLs of the two
implementations directly (the pikv port of the same weights: max |Δlogit| 6e-5 on SmolLM2,
docs/kv.md; the test's small Llama agrees to 1e-3 in log-prob through a compressed prefill).

Bytes: kvpress keeps exact K/V; a row's peak is the largest total of its key and value tensors
over the run, counted at 2 bytes per element (the fp16 cache PiKV's full row is), per window.
M is the largest budget whose peak (M + 1 tokens: the new token before the step's compression)
reaches the target against PiKV's full-cache peak on the same windows. Shapes: B batch, N
sequence length, C = N - P scored tokens, V vocab.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pikv.eval.kv import KVEvalRow, finish_row

# display name -> kvpress class: ScorerPresses, which DecodingPress accepts
PRESSES = {"SnapKV": "SnapKVPress", "StreamingLLM": "StreamingLLMPress", "ObservedAttention": "ObservedAttentionPress",
           "ExpectedAttention": "ExpectedAttentionPress", "TOVA": "TOVAPress", "Knorm": "KnormPress"}


# Presses whose score is a function of the slot index, which per-step compression breaks: kvpress's
# ScorerPress gathers the top-k slots unsorted (ties in any order), so after one compression the
# cache is no longer in position order, and StreamingLLM's next "oldest non-sink" is an arbitrary
# token (seen: first decode step equal to PiKV's streaming, later ones not; tests/unit/test_kvpress_decode.py).
BY_SLOT_ORDER = {"StreamingLLM": "kvpress StreamingLLM scores cache slots by index, and its top-k gather reorders "
                                 "the slots, so compressing after every decoded token evicts arbitrary tokens "
                                 "(PiKV's streaming equals kvpress's in the prefill-only protocol: bench/kv_vs_kvpress.py)"}


def press_for(name: str, budget: int, prefill: int):
    """kvpress's PrefillDecodingPress keeping `budget` tokens per layer from the prefill on."""
    import kvpress
    if name not in PRESSES:
        raise ValueError(f"unknown kvpress press {name!r}: allowed are {', '.join(PRESSES)}")
    cls = getattr(kvpress, PRESSES[name])
    decoding = kvpress.DecodingPress(base_press=cls(), compression_interval=1, target_size=budget)
    prefill_press = cls(compression_ratio=decoding._find_target_compression_ratio(prefill, budget))
    return kvpress.PrefillDecodingPress(prefilling_press=prefill_press, decoding_press=decoding)


@torch.no_grad()
def hf_decode(hf, seq_BN: torch.Tensor, prefill: int, press=None) -> tuple[torch.Tensor, float, int]:
    """(log-probs [B, C, V] of tokens prefill..N-1, decode seconds, peak K/V elements per window:
    after each step, plus with a press the decoded token each layer held before compressing, as
    PiKV's caches count their one slot of capacity; the prefill's transient is counted by neither)."""
    import contextlib
    from transformers import DynamicCache
    B, N = seq_BN.shape
    cache, peak = DynamicCache(), 0

    def step(ids, pos):
        nonlocal peak
        logits = hf(ids, past_key_values=cache, position_ids=pos[None]).logits[:, -1].float()
        held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) // B
        if press is not None and ids.shape[1] == 1:  # a layer held the new token before its compression
            held += sum(layer.keys[0, :, :1].numel() + layer.values[0, :, :1].numel() for layer in cache.layers)
        peak = max(peak, held)
        return logits

    with press(hf) if press is not None else contextlib.nullcontext():
        logits = [step(seq_BN[:, :prefill], torch.arange(prefill))]
        t0 = time.perf_counter()
        for t in range(prefill, N - 1):
            logits.append(step(seq_BN[:, t:t + 1], torch.tensor([t])))
        secs = time.perf_counter() - t0
    return torch.log_softmax(torch.stack(logits, 1), -1), secs, peak


def kvpress_rows(hf, seq_XN: torch.Tensor, prefill: int, presses: list[str], targets: list[float],
                 full_peak_bytes: int, batch_size: int = 8, progress=print) -> list[KVEvalRow]:
    """One row per (press, target): NLL, ΔNLL vs the HF full cache (paired per window), KL, top-1,
    decode tokens/s, measured ratio = `full_peak_bytes` (PiKV's fp16 full cache, one window) /
    the press's peak bytes per window."""
    X, N = seq_XN.shape
    cfg = hf.config
    token_bytes = cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    ref = [hf_decode(hf, seq_XN[i:i + batch_size], prefill) for i in range(0, X, batch_size)]
    tgt = seq_XN[:, prefill:]
    full_nll_X = np.concatenate([(-lp.gather(-1, tgt[i * batch_size:(i + 1) * batch_size, :, None])[..., 0]).sum(1)
                                 .double().numpy() for i, (lp, _, _) in enumerate(ref)]) / (N - prefill)
    rows = []
    for target in targets:
        budget = int(full_peak_bytes / target // token_bytes) - 1  # peak: budget + 1 tokens per layer
        for name in presses:
            row = KVEvalRow(f"kvpress:{name}", target)
            if name in BY_SLOT_ORDER:
                row.skipped = BY_SLOT_ORDER[name]
                rows.append(row)
                continue
            if budget < 1:
                row.skipped = f"{target:g}x leaves no token of budget for kvpress (needs M + 1 tokens at the peak)"
                rows.append(row)
                continue
            a = {"nll": [], "kl": 0.0, "agree": 0.0, "time": 0.0, "peak": 0, "read": 0}
            for b, (ref_lp, _, _) in enumerate(ref):
                seq = seq_XN[b * batch_size:(b + 1) * batch_size]
                try:
                    lp, secs, peak = hf_decode(hf, seq, prefill, press_for(name, budget, prefill))
                except AssertionError as err:  # kvpress rejects a setting by assertion (SnapKV: its window)
                    row.skipped = f"kvpress {name} cannot compress after every decoded token: {err}"
                    break
                a["nll"].append((-lp.gather(-1, seq[:, prefill:, None])[..., 0]).sum(1).double().numpy())
                a["kl"] += float((ref_lp.exp() * (ref_lp - lp)).sum(-1).sum())
                a["agree"] += float((lp.argmax(-1) == ref_lp.argmax(-1)).float().sum())
                a["time"] += secs
                a["peak"] += peak * 2 * seq.shape[0]  # bytes at fp16, per batch as PiKV's rows
            rows.append(row)
            if row.skipped:
                progress(f"kvpress {name} at {target:g}x: {row.skipped}")
                continue
            finish_row(row, a, full_nll_X, full_peak_bytes * X, 0, X, N - prefill, len(ref))
            progress(f"kvpress {name} at {target:g}x (M = {budget}): {row.compression_ratio:.2f}x measured, "
                     f"Δppl {row.ppl_change_pct:+.2f}%")
    return rows
