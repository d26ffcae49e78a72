"""Retrieval-probe evaluation of KV-cache policies: passkey accuracy vs needle depth.

Shapes: X probe sequences, N sequence length, K key digits, B batch.

Each held-out window gets a needle `#<key>|` at a depth (fraction of the context before it) and
ends with the query `#` + key (pikv/data/probe.py, the format the model was trained on), after the
probe's BOS when it has one (one of the N tokens, kept or evicted like any other). The model
prefills everything up to the query, under the policy's budget (ratio r keeps N / r tokens, as
in the decoding evaluation), then decodes the K key tokens one at a time (teacher forced, the
budget enforced after every step). A sequence counts as recalled when the argmax at every key
position is the true digit. The full fp16 cache must score >= 95% for the probe to say anything
about the other methods (`valid` in the summary).
"""

from __future__ import annotations

from typing import Optional

import torch

from pikv.data import eot_id
from pikv.data.probe import NATURAL, PasskeyProbe
from pikv.eval.decode import decode_logprobs
from pikv.kv import make_cache

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
VALID_FULL_ACCURACY = 0.95


def probe_for(tokenizer, trained: bool) -> PasskeyProbe:
    """The probe a model is scored on (`tokenizer`: a tokenizers.Tokenizer). `trained` (its run had
    data.probe_rate > 0): the `#key|` format it was trained on, no BOS, as PiKV's models are trained.
    Otherwise the passkey test's own wording (NATURAL), which a pretrained model follows untrained,
    after the tokenizer's document separator: what starts a document in PiKV's packed stream and in
    SmolLM2's pretraining. Without it the needle at depth 0 is also the first token, the attention
    sink: SmolLM2's full cache recalled 0.90 of the probes without a BOS, 0.95 after <|im_start|>,
    1.00 after <|endoftext|> (bench/kv_probe_smollm2.py, 8 windows)."""
    if trained:
        return PasskeyProbe(tokenizer)
    return PasskeyProbe(tokenizer, wording=NATURAL, bos_id=eot_id(tokenizer))


@torch.no_grad()
def evaluate_probe(model, probe: PasskeyProbe, fillers_XN: torch.Tensor,
                   specs: list[tuple[str, Optional[float]]], batch_size: int = 16,
                   svd_bases=None, depths=DEPTHS) -> dict[tuple[str, Optional[float]], dict]:
    """{(policy, ratio): {"accuracy": float, "by_depth": {depth: accuracy}} or {"skipped": why}}
    for the full cache ("full", 1.0) and every spec, on every filler at every depth."""
    model.eval()
    seqs, depth_X = probe.eval_set(fillers_XN.numpy(), list(depths))
    seq_XN = torch.from_numpy(seqs)
    X, N = seq_XN.shape
    K = probe.key_len
    out: dict[tuple[str, Optional[float]], dict] = {}
    for policy, ratio in [("full", 1.0)] + [s for s in specs if s[0] != "full"]:
        hit_X = torch.zeros(X, dtype=torch.bool)
        try:
            for b0 in range(0, X, batch_size):
                seq = seq_XN[b0:b0 + batch_size]
                cache = (make_cache("full", model, total_tokens=N) if policy == "full" else
                         make_cache(policy, model, ratio=ratio, total_tokens=N, svd_bases=svd_bases))
                lp, _ = decode_logprobs(model, seq, N - K, cache)
                hit_X[b0:b0 + batch_size] = (lp.argmax(-1) == seq[:, N - K:]).all(1)
        except ValueError as err:  # an impossible budget: the decoding evaluation reports it too
            out[(policy, ratio)] = {"skipped": str(err)}
            continue
        hits = hit_X.numpy()
        out[(policy, ratio)] = {"accuracy": float(hits.mean()),
                                "by_depth": {f"{d:g}": float(hits[depth_X == d].mean()) for d in depths}}
    return out


def summary(results: dict, probe: PasskeyProbe, sequences: int, N: int) -> dict:
    """What results.json records about the probe as a whole."""
    full = results[("full", 1.0)]["accuracy"]
    return {"format": probe.describe(),
            "sequences": sequences, "sequence_length": N, "depths": list(DEPTHS),
            "full_accuracy": full, "valid": full >= VALID_FULL_ACCURACY}


def markdown(results: dict) -> str:
    """Accuracy by depth, one row per method and ratio."""
    head = "| policy | ratio | " + " | ".join(f"depth {d:g}" for d in DEPTHS) + " | all |"
    lines = [head, "|" + "---|" * (len(DEPTHS) + 3)]
    for (policy, ratio), r in results.items():
        if "skipped" in r:
            continue
        cells = " | ".join(f"{r['by_depth'][f'{d:g}']:.2f}" for d in DEPTHS)
        lines.append(f"| {policy} | {ratio:g} | {cells} | {r['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"
