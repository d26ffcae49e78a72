"""Attention over what a KV cache holds: GQA softmax attention (with the probabilities when a
selection rule scores by them), the visibility mask of stored positions, and RoPE at stored
positions.

Shapes: B batch, N query heads, G kv heads, H heads of a keep set (G, or 1 when the kv heads share
one), T queries, S stored tokens, K keys read (S, or more when a storage reads a token twice: the
learned latent's exact window), D head dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention(q_BNTD, k_BGSD, v_BGSD, keep, need_probs: bool):
    """Softmax attention with GQA (kv head g serves query heads g*N/G .. (g+1)*N/G - 1, as HF
    repeat_kv, without the copies). keep: bool [T,S] or [B,H,T,S] with H in (1, G) (True = may
    attend) or None. Returns (o_BNTD, probs_BNTS or None)."""
    B, N, T, D = q_BNTD.shape
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    k_BGSD, v_BGSD = k_BGSD.to(q_BNTD.dtype), v_BGSD.to(q_BNTD.dtype)
    if not need_probs:
        if keep is not None and keep.dim() == 4:
            keep = keep.repeat_interleave(N // G, dim=1) if keep.shape[1] == G else keep
        return F.scaled_dot_product_attention(q_BNTD, k_BGSD, v_BGSD, attn_mask=keep, enable_gqa=True), None
    # Each kv head's N/G query heads as one [N/G*T, D] block: one batched matmul per kv head,
    # without materialising repeated keys/values (measured: the copies dominated a decode step).
    q_BGMD = q_BNTD.reshape(B, G, N // G * T, D)
    s_BGHTS = ((q_BGMD @ k_BGSD.transpose(-1, -2)) / math.sqrt(D)).view(B, G, N // G, T, S)
    if keep is not None:
        keep = keep[:, :, None] if keep.dim() == 4 else keep
        s_BGHTS = s_BGHTS.masked_fill(~keep, float("-inf"))
    p_BGHTS = torch.softmax(s_BGHTS.float(), dim=-1).to(q_BNTD.dtype)
    o_BNTD = (p_BGHTS.view(B, G, N // G * T, S) @ v_BGSD).view(B, N, T, D)
    return o_BNTD, p_BGHTS.view(B, N, T, S)


def group_sum(p_BNTS: torch.Tensor, H: int) -> torch.Tensor:
    """Attention mass per stored token and keep-set head, summed over the head's query heads and
    the queries: [B,H,S] (H = G: per kv head; H = 1: over all heads)."""
    B, N, T, S = p_BNTS.shape
    return p_BNTS.reshape(B, H, N // H, T, S).sum(dim=(2, 3))


def visible(q_pos_T: torch.Tensor, key_pos, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
    """Which keys each query may read: lo <= q_pos - key_pos (< hi). key_pos: [K] or [B,H,K];
    returns [T,K] or [B,H,T,K]."""
    d = q_pos_T[:, None] - (key_pos if key_pos.dim() == 1 else key_pos[:, :, None, :])
    ok = d >= lo
    return ok if hi is None else ok & (d < hi)


def rotate_at(rope, x_BHSD: torch.Tensor, pos) -> torch.Tensor:
    """RoPE of `rope` (pikv.models.transformer.RotaryEmbedding) applied at stored positions: an int
    (contiguous from it: the module itself) or a [B,H',S] tensor (tokens kept after evictions)."""
    if isinstance(pos, int):
        return rope(x_BHSD, pos)
    return rope.at_positions(x_BHSD, pos)


def attention_lse(q_BNTD, k_BGSD, v_BGSD, keep):
    """Softmax attention over these keys alone, with what an exact merge with attention over other
    keys needs: (o_BNTD, lse_BNT fp32, logits_BNTS fp32 before the mask). keep: as `attention`.
    A query that may read no key here gets o = 0 and lse = -inf (no weight in `merge_partials`).
    The softmax statistics are fp32 whatever the input dtype (flash-decoding keeps them in fp32)."""
    B, N, T, D = q_BNTD.shape
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    k_BGSD, v_BGSD = k_BGSD.to(q_BNTD.dtype), v_BGSD.to(q_BNTD.dtype)
    q_BGMD = q_BNTD.reshape(B, G, N // G * T, D)
    s_BGHTS = ((q_BGMD @ k_BGSD.transpose(-1, -2)).float() / math.sqrt(D)).view(B, G, N // G, T, S)
    masked = s_BGHTS
    if keep is not None:
        keep = keep[:, :, None] if keep.dim() == 4 else keep
        masked = s_BGHTS.masked_fill(~keep, float("-inf"))
    lse_BGHT = torch.logsumexp(masked, dim=-1)
    p_BGHTS = torch.exp(masked - _finite(lse_BGHT)[..., None])  # a row without keys: exp(-inf) = 0
    o_BNTD = (p_BGHTS.to(q_BNTD.dtype).view(B, G, N // G * T, S) @ v_BGSD).view(B, N, T, D)
    return o_BNTD, lse_BGHT.view(B, N, T), s_BGHTS.view(B, N, T, S)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (a row that reads nothing) -> 0, so that x - it stays -inf instead of nan."""
    return x.masked_fill(torch.isinf(x), 0.0)


def merge_partials(o_RBNTD: torch.Tensor, lse_RBNT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of R attentions of the same queries over disjoint key sets (flash-decoding,
    ring attention): o = sum_r exp(lse_r - lse) o_r with lse = log sum_r exp(lse_r). A part that
    read nothing (lse -inf) weighs 0. Returns (o_BNTD in fp32, lse_BNT)."""
    m_BNT = _finite(lse_RBNT.amax(dim=0))
    w_RBNT = torch.exp(lse_RBNT - m_BNT)
    total_BNT = w_RBNT.sum(dim=0)
    o_BNTD = (w_RBNT[..., None] * o_RBNTD.float()).sum(dim=0) / total_BNT.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return o_BNTD, m_BNT + torch.log(total_BNT)

class OnlineSoftmax:
    """Softmax attention accumulated over blocks of keys (flash attention's running max and sum), so
    no score matrix over all keys is held: a store that attends in its compressed domain feeds each
    block's scores [..., K] (fp32, -inf = masked) to `weights`, multiplies the returned unnormalised
    weights into that block's values itself and adds the result with `add`. With keep_scores, the
    blocks' scores are kept to return the probabilities per key (a selection that scores tokens by
    attention needs them)."""

    def __init__(self, keep_scores: bool):
        self.max = self.sum = self.out = None
        self.scores = [] if keep_scores else None

    def weights(self, s: torch.Tensor) -> torch.Tensor:
        # -1e30, not -inf: a query whose keys so far are all masked then gets exp(-inf - -1e30) = 0
        # weights and a finite running max, without a special case
        m = s.amax(-1, keepdim=True).clamp_min(-1e30)
        if self.max is not None:  # out of place throughout: autograd may be on
            m = torch.maximum(self.max, m)
            alpha = torch.exp(self.max - m)
            self.sum, self.out = self.sum * alpha, self.out * alpha
        p = torch.exp(s - m)
        p_sum = p.sum(-1, keepdim=True)
        self.sum = p_sum if self.sum is None else self.sum + p_sum
        self.max = m
        if self.scores is not None:
            self.scores.append(s)
        return p

    def add(self, out: torch.Tensor) -> None:
        self.out = out if self.out is None else self.out + out

    def result(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output, probabilities over every key or None)."""
        probs = None
        if self.scores is not None:
            probs = torch.exp(torch.cat(self.scores, -1) - self.max) / self.sum
        return self.out / self.sum, probs


def blockwise_attention(q_BNTD, G: int, blocks, mask, need_probs: bool):
    """Softmax attention (GQA, as `attention`) over keys/values a store gives block by block, each
    block as (lo, hi, scores(q_BGMD) -> s_BGMK, values(p_BGMK) -> o_BGMD) over stored tokens lo..hi-1
    (M = N/G * T: a kv head's query heads and queries; q is fp32, already scaled by 1/sqrt(D)).
    mask: bool [T, S] or [B, H, T, S] (H in 1, G) or None. Computed in fp32; returns (o_BNTD in
    q's dtype, probs_BNTS or None)."""
    B, N, T, D = q_BNTD.shape
    q_BGMD = (q_BNTD.float() / math.sqrt(D)).reshape(B, G, N // G * T, D)
    acc = OnlineSoftmax(need_probs)
    for lo, hi, scores, values in blocks:
        s_BGMK = scores(q_BGMD)
        if mask is not None:
            keep = mask[..., lo:hi]
            keep = keep[:, :, None] if keep.dim() == 4 else keep
            s_BGMK = s_BGMK.reshape(B, G, N // G, T, hi - lo).masked_fill(~keep, float("-inf")).view(s_BGMK.shape)
        acc.add(values(acc.weights(s_BGMK)))
    o_BGMD, p_BGMS = acc.result()
    probs = None if p_BGMS is None else p_BGMS.view(B, N, T, -1)
    return o_BGMD.view(B, N, T, D).to(q_BNTD.dtype), probs
