"""Language-model evaluation: NLL, perplexity and bits-per-byte over a token split.

Bits-per-byte is tokenizer-independent: total NLL in bits divided by the number of UTF-8 bytes
the scored target tokens stand for (exact for a byte-level tokenizer; see
`pikv.data.token_byte_lengths`). Perplexity is per token and so depends on the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class LMEvalResult:
    nll: float  # mean nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                byte_lengths: np.ndarray, device: torch.device,
                autocast_dtype: Optional[torch.dtype] = None) -> LMEvalResult:
    """Score every target token of `batches` (this rank's shard); sums are reduced over ranks."""
    was_training = model.training
    model.eval()
    byte_lengths_V = torch.as_tensor(byte_lengths, dtype=torch.float64, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    for inputs_BT, targets_BT in batches:
        inputs_BT, targets_BT = inputs_BT.to(device), targets_BT.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits_BTV = model(inputs_BT)
        nll = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="sum")
        totals[0] += nll.double()
        totals[1] += targets_BT.numel()
        totals[2] += byte_lengths_V[targets_BT].sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    nats, tokens, n_bytes = totals.tolist()
    if tokens == 0:
        raise ValueError("evaluation split produced no tokens: it is shorter than one block of data.seq_len+1")
    mean_nll = nats / tokens
    return LMEvalResult(nll=mean_nll, perplexity=math.exp(mean_nll), bits_per_byte=nats / math.log(2) / n_bytes,
                        tokens=int(tokens), bytes=int(n_bytes))
