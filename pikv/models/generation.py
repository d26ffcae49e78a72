"""Autoregressive decoding with the KV cache: prefill once, then one token per step.

Shapes: B batch, T prompt tokens, V vocab.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from pikv.kv.cache import KVCache


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B, 1]: argmax when temperature == 0, else sample softmax(logits / temperature)
    restricted to the top_k logits (if given)."""
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int]) -> None:
    """ValueError naming the bad decoding option."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k={top_k} must be a positive integer or None")


@torch.no_grad()
def decode_tokens(model, prompt_BT: torch.Tensor, max_new_tokens: int, cache,
                  pick: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[torch.Tensor]:
    """Prefill `prompt_BT` into `cache`, then yield each next token [B, 1] chosen by
    pick(last logits [B, V]); the last token is not fed back (its logits are never needed)."""
    logits_BTV = model(prompt_BT, cache)
    for step in range(max_new_tokens):
        next_B1 = pick(logits_BTV[:, -1])
        yield next_B1
        if step + 1 < max_new_tokens:
            logits_BTV = model(next_B1, cache)


@torch.no_grad()
def generate(model, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cache: Optional[KVCache] = None, kv_policy: Optional[str] = None,
             kv_ratio: Optional[float] = None, kv_tokens: Optional[int] = None) -> torch.Tensor:
    """prompt_BT -> tokens [B, T + max_new_tokens]. Reproducible with a seeded torch.Generator
    (on the model's device). The output may not exceed model.cfg.max_seq_len.
    kv_policy (a method name: `h2o`, `quant`, `quant+snapkv`, `learned@2+h2o`; + kv_ratio or
    kv_tokens) decodes with a compressed cache (pikv.kv.make_cache). Across processes:
    pikv.inference (train/generate.py)."""
    B, T = prompt_BT.shape
    check_sampling(max_new_tokens, temperature, top_k)
    if T == 0:
        raise ValueError("prompt_BT must hold at least one token")
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if max_new_tokens == 0:
        return prompt_BT
    if kv_policy is not None and cache is None:
        from pikv.kv.registry import make_cache
        cache = make_cache(kv_policy, model, ratio=kv_ratio, tokens=kv_tokens, total_tokens=T + max_new_tokens)
    cache = cache if cache is not None else KVCache(model.cfg.num_layers)
    steps = decode_tokens(model, prompt_BT, max_new_tokens, cache,
                          lambda logits_BV: sample_next(logits_BV, temperature, top_k, generator))
    return torch.cat([prompt_BT, *steps], dim=1)
