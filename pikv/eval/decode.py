"""Teacher-forced decoding under a KV cache: what the KV decoding evaluation (pikv/eval/kv.py) and
the retrieval probe (pikv/eval/probe.py) both run. Shapes: B batch, N sequence length, C scored
tokens, V vocab."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def decode_logprobs(model, seq_BN: torch.Tensor, prefill: int, cache) -> tuple[torch.Tensor, float]:
    """Teacher-forced decoding: log-probs [B, C, V] of tokens prefill..N-1, and decode seconds."""
    B, N = seq_BN.shape
    logits = [model(seq_BN[:, :prefill], cache)[:, -1].float()]
    t0 = time.perf_counter()
    for t in range(prefill, N - 1):
        logits.append(model(seq_BN[:, t:t + 1], cache)[:, -1].float())
    return torch.log_softmax(torch.stack(logits, 1), -1), time.perf_counter() - t0
