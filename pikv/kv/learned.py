"""The learned KV compressor: a nested (Matryoshka) low-rank latent of each layer's keys and values,
trained jointly with the model.

Shapes: B batch, G kv heads, T tokens, D head dim, P rotated key dims held apart (0: the joint
latent), C = G*(2*D - P) (the numbers of one token and layer the latent encodes), R latent rank.

Per layer, one token's pre-RoPE keys and its values (all kv heads, concatenated: C numbers) are
encoded into a latent of rank R by `down` and decoded by `up`; the cache stores the latent
and re-applies RoPE to the decoded keys at their known positions. This is the joint
K/V latent of DeepSeek-V2's multi-head latent attention (MLA, arXiv:2405.04434), kept as a
bypassable autoencoder so the same model also runs with a full cache (the reference). Compressing
keys before RoPE follows MLA's decoupled RoPE and Palu (arXiv:2407.21118): pre-RoPE keys are
low rank, post-RoPE keys are not. The rank is nested (Matryoshka representation learning,
Kusupati et al. 2022): rank r uses the first r rows of `down` and columns of `up`, so one module
serves every budget; training cycles over the ranks of the budgets it will be evaluated at (and
the full cache), so the model co-adapts to each (the co-training that distinguishes DMC/DMS,
arXiv:2403.09636 / 2506.05345, from post-hoc compression).

With `bits=8` the latent is stored as int8 codes with one fp16 absmax scale per token and layer,
as Palu quantizes its low-rank latents: at the same bytes that is about twice the rank of fp16
codes, and rounding the kept coordinates to 8 bits loses far less than halving the rank. Training runs the same
quantization in the loop (straight-through gradient), so the compressor learns a latent that
survives it and the single-pass training forward equals decoding from the int8 cache. With
`bits=4` the codes are int4 with one fp16 scale per group of `group` consecutive latent coordinates
(pikv/kv/latent_codes.py), again in the training loop: at 8x about 1.8x the rank of int8 codes.

With partial rotary (model.rotary_fraction < 1, `rotary_dims` > 0) the latent is MLA's decoupled
one: it encodes only the position-free key dims and the values, and the rotated key dims of each
kv head are held apart after RoPE (int8 with one fp16 scale per token when bits <= 8, else the store
dtype; their bytes come off the rank, `latent_rank`). Nothing stored then needs RoPE again, so a
decode step can fold the key up-projection into the query and the value up-projection into the
output and attend over the codes themselves (pikv/kv/mla.py). A fully rotary key has no
position-free part, so full-rotary models (every checkpoint before partial rotary) keep the joint
latent of all pre-RoPE key dims.

With `window` > 0 the most recent `window` tokens are also held exactly: a query reads them at
full precision and only older tokens through the latent, whose rank gets the bytes the window
leaves (`latent_rank`). Attention mass concentrates on recent tokens (the reason recency eviction
is cheap), so the latent's error costs most there; KIVI keeps an fp16 residual of recent tokens
beside its quantized cache, and StreamingLLM / H2O always keep a recent window, for the same reason.
"""

from __future__ import annotations

from contextlib import contextmanager

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pikv.kv.latent_codes import LATENT_GROUP, LatentFormat


class LatentKVCompressor(nn.Module):
    """down: C -> R_max, up: R_max -> C, used at a prefix rank (the rank of a training step is in
    KVTrainState, the rank of a cache in the cache: the module itself holds no mode)."""

    def __init__(self, num_kv_heads: int, head_dim: int, max_rank: int, bits: int = 16, window: int = 0,
                 rotary_dims: int = 0, group: int = LATENT_GROUP):
        super().__init__()
        self.codes = LatentFormat(bits, group)  # the trained format; a cache may store another (registry)
        if window < 0:
            raise ValueError(f"kv latent window {window} must be >= 0 (recent tokens kept exact)")
        if not 0 <= rotary_dims < head_dim:
            raise ValueError(f"kv latent rotary_dims {rotary_dims} must be in [0, {head_dim - 1}] (0: the joint "
                             f"latent of every key dim; else the rotated key dims held apart, decoupled RoPE)")
        self.G, self.D, self.bits, self.window, self.rot = num_kv_heads, head_dim, bits, window, rotary_dims
        C = latent_width(num_kv_heads, head_dim, rotary_dims)
        if not 0 < max_rank <= C:
            raise ValueError(f"kv latent rank {max_rank} must be in [1, {C}] (kv heads * (2 * head dim - rotary dims))")
        self.max_rank = max_rank
        self.down = nn.Linear(C, max_rank, bias=False)
        self.up = nn.Linear(max_rank, C, bias=False)
        with torch.no_grad():  # start as an orthogonal projection (a random PCA-like basis)
            q, _ = torch.linalg.qr(torch.randn(C, max_rank))
            self.down.weight.copy_(q.T)
            self.up.weight.copy_(q)

    def check_rank(self, rank: int) -> int:
        if not 0 < rank <= self.max_rank:
            raise ValueError(f"learned kv rank {rank} is impossible: the compressor was trained up to "
                             f"rank {self.max_rank} (allowed 1..{self.max_rank})")
        return rank

    def encode(self, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, rank: int) -> torch.Tensor:
        """keys + values -> latent [B, T, rank]. The joint latent reads pre-RoPE keys; the decoupled
        one only key dims rot.. (position-free: the same before and after RoPE)."""
        B, G, T, D = v_BGTD.shape
        k_BTC = k_BGTD[..., self.rot:].transpose(1, 2).reshape(B, T, -1)
        x_BTC = torch.cat([k_BTC, v_BGTD.transpose(1, 2).reshape(B, T, G * D)], -1)
        return x_BTC @ self.down.weight[:rank].T

    def decode(self, c_BTR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, T, r] -> (key dims rot.. [B, G, T, D - rot]: pre-RoPE keys of the joint
        latent, values [B, G, T, D])."""
        B, T, r = c_BTR.shape
        x_BTC = c_BTR @ self.up.weight[:, :r].T
        Ck = self.G * (self.D - self.rot)
        k = x_BTC[..., :Ck].reshape(B, T, self.G, self.D - self.rot).transpose(1, 2)
        return k, x_BTC[..., Ck:].reshape(B, T, self.G, self.D).transpose(1, 2)

    def encoded_dims(self) -> torch.Tensor:
        """Where the C numbers this latent encodes sit in one token's [keys of every kv head; values]
        (2*G*D numbers): key dims rot.. of each head, then every value (pikv/kv/fit.py's PCA)."""
        keys = (torch.arange(self.G)[:, None] * self.D + torch.arange(self.rot, self.D)).flatten()
        return torch.cat([keys, self.G * self.D + torch.arange(self.G * self.D)])

    def up_k_GCR(self, rank: int) -> torch.Tensor:
        """The key up-projection per kv head [G, D - rot, rank] (absorbed into the queries)."""
        Ck = self.G * (self.D - self.rot)
        return self.up.weight[:Ck, :rank].view(self.G, self.D - self.rot, rank)

    def up_v_GDR(self, rank: int) -> torch.Tensor:
        """The value up-projection per kv head [G, D, rank] (absorbed into the output)."""
        Ck = self.G * (self.D - self.rot)
        return self.up.weight[Ck:, :rank].view(self.G, self.D, rank)

    def forward(self, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, rank: int):
        """Round trip at `rank` through the stored format: (key dims rot.., values)."""
        # straight-through: the forward sees the stored codes' round trip, the gradient is the identity
        return self.decode(self.codes.round_trip(self.encode(k_BGTD, v_BGTD, rank)))

    def reconstruct(self, k_pre_BGTD, k_BGTD, v_BGTD, rank: int, rope, start: int):
        """Keys after RoPE and values as a query reads them through the latent at `rank` (the
        training / masked-evaluation pass; the cache holds the same numbers). Joint: decode, then
        rotate at positions start..; decoupled: the rotated dims from `k_BGTD` through their
        stored format (int8 round trip with a straight-through gradient), the rest decoded."""
        k_dec, v_hat = self(k_pre_BGTD, v_BGTD, rank)
        if not self.rot:
            return rope(k_dec, start), v_hat
        return torch.cat([self.codes.rotary_round_trip(k_BGTD[..., :self.rot]), k_dec], -1), v_hat

    def attention(self, q_BNTD: torch.Tensor, k_lat_BGSD: torch.Tensor, v_lat_BGSD: torch.Tensor,
                  k_BGED: torch.Tensor, v_BGED: torch.Tensor) -> torch.Tensor:
        """Causal attention of the T queries at positions S-T..S-1 over a latent cache whose last
        `window` positions are also held exactly: a query at p reads key j exactly when
        p - window < j <= p, through the latent when j <= p - window. Keys after RoPE; the latent
        ones cover positions 0..S-1, the exact ones the last E (>= min(window, S)) positions."""
        T, S, E = q_BNTD.shape[2], k_lat_BGSD.shape[2], k_BGED.shape[2]
        dist_TS = torch.arange(S - T, S, device=q_BNTD.device)[:, None] - torch.arange(S, device=q_BNTD.device)
        if self.window == 0:
            return F.scaled_dot_product_attention(q_BNTD, k_lat_BGSD, v_lat_BGSD,
                                                  attn_mask=dist_TS >= 0 if T > 1 else None, enable_gqa=True)
        exact_TE = (dist_TS[:, S - E:] >= 0) & (dist_TS[:, S - E:] < self.window)
        mask = torch.cat([dist_TS >= self.window, exact_TE], 1)
        return F.scaled_dot_product_attention(q_BNTD, torch.cat([k_lat_BGSD, k_BGED], 2),
                                              torch.cat([v_lat_BGSD, v_BGED], 2), attn_mask=mask, enable_gqa=True)

    def side_attn_error(self, q_BNTD: torch.Tensor, k_pre_BGTD: torch.Tensor, k_BGTD: torch.Tensor,
                     v_BGTD: torch.Tensor, o_BNTD: torch.Tensor, rope, start: int, rank: int) -> torch.Tensor:
        """Distillation-only training: the model's attention used the full K/V (o_BNTD); attend
        again through the latent at `rank` and return the error to o_BNTD. Every model
        input is detached, so this trains the compressor only and the model is untouched."""
        k_hat, v_hat = self.reconstruct(k_pre_BGTD.detach(), k_BGTD.detach(), v_BGTD.detach(), rank, rope, start)
        o_hat = self.attention(q_BNTD.detach(), k_hat, v_hat, k_BGTD.detach(), v_BGTD.detach())
        return attention_error(o_hat, o_BNTD.detach())


def attention_error(o_BNTD: torch.Tensor, o_ref_BNTD: torch.Tensor) -> torch.Tensor:
    """Relative squared error of each head's output vector, averaged over (batch, head, token):
    scale-free (the model cannot lower it by shrinking its values), and a plain mean, so equal
    data-parallel shards average to the global-batch value."""
    return ((o_BNTD - o_ref_BNTD).pow(2).sum(-1) / (o_ref_BNTD.pow(2).sum(-1) + 1e-6)).mean()


def latent_width(num_kv_heads: int, head_dim: int, rotary_dims: int = 0) -> int:
    """Numbers per token the latent compresses: the values and the key dims not held apart."""
    return num_kv_heads * (2 * head_dim - rotary_dims)


def latent_rotary_dims(model_cfg) -> int:
    """The key dims per head a model's compressor holds apart (pikv.config.ModelConfig): the
    rotated ones when RoPE covers only part of the head (rotary_fraction < 1: the decoupled
    latent of MLA), else 0 (the joint latent: a fully rotary key has no position-free part)."""
    D = model_cfg.hidden_size // model_cfg.num_heads
    rot = round(model_cfg.rotary_fraction * D)
    return rot if rot < D else 0


def latent_rank(num_kv_heads: int, head_dim: int, ratio: float, bits: int = 16, window: int = 0,
                length: Optional[int] = None, rotary_dims: int = 0, group: int = LATENT_GROUP) -> int:
    """The largest latent rank whose cache fits the fp16 keys + values' bytes / `ratio`: per token
    the codes at `bits` with their fp16 scales (LatentFormat(bits, group).token_bytes), plus
    (decoupled latent, `rotary_dims` > 0) the rotated key dims held apart (LatentFormat.rotary_bytes). With
    `window` > 0, a sequence of `length` tokens keeps its last `window` tokens exact (fp16) and the
    latent of the other length - window tokens gets the bytes those leave. ValueError when nothing
    is left for it."""
    if not ratio >= 1:
        raise ValueError(f"compression ratio {ratio} must be >= 1")
    full = 4 * num_kv_heads * head_dim  # fp16 bytes of one token's keys + values
    if window and (length is None or length <= window):
        raise ValueError(f"kv latent window {window} needs a sequence length above it (got {length})")
    fmt = LatentFormat(bits, group)

    def per_token(r: float) -> float:  # bytes per latent-held token at ratio r
        return full / r if not window else (length * full / r - window * full) / (length - window)
    budget = per_token(ratio) - fmt.rotary_bytes(num_kv_heads, rotary_dims) + 1e-9
    # codes alone bound the rank from above; each step down sheds at least part of a byte
    rank = min(latent_width(num_kv_heads, head_dim, rotary_dims), math.floor(max(budget, 0) * 8 / bits))
    while rank >= 1 and fmt.token_bytes(rank) > budget:
        rank -= 1
    if rank >= 1:
        return rank
    _no_rank(num_kv_heads, ratio, window, length, rotary_dims, fmt, full, per_token(ratio))


def _no_rank(num_kv_heads, ratio, window, length, rotary_dims, fmt: LatentFormat, full: int, per_token: float):
    """The ValueError of a budget that leaves no latent rank >= 1 (what is possible, when rotary dims take it)."""
    beside = f" beside a {window}-token exact window over {length} tokens" if window else ""
    if not rotary_dims:
        raise ValueError(f"kv compression ratio {ratio} is impossible for the learned latent{beside}: "
                         f"{per_token:.1f} bytes per token leave no latent rank >= 1")
    rot = fmt.rotary_bytes(num_kv_heads, rotary_dims)
    need = rot + fmt.token_bytes(1)  # the rotated dims and a rank-1 latent
    top = full / need if not window else length * full / (window * full + (length - window) * need)
    raise ValueError(f"kv compression ratio {ratio} is impossible for the decoupled learned latent{beside}: "
                     f"the {rotary_dims} rotary key dims of each of {num_kv_heads} kv heads take {rot} bytes per "
                     f"token of the {per_token:.1f} it allows, leaving no latent rank >= 1; possible: "
                     f"ratio <= {math.floor(top * 100) / 100:g} (or fewer rotary dims, model.rotary_fraction)")


def train_rank_schedule(num_kv_heads: int, head_dim: int, ratios: list[float], full_every: int,
                        bits: int = 16, window: int = 0, length: Optional[int] = None,
                        rotary_dims: int = 0) -> list[Optional[int]]:
    """The ranks cycled over training steps: each trained ratio once, and the full cache (None)
    once every `full_every` entries (0 = never)."""
    ranks: list[Optional[int]] = [latent_rank(num_kv_heads, head_dim, r, bits, window, length, rotary_dims)
                                  for r in sorted(ratios)]
    if full_every > 0:
        out: list[Optional[int]] = []
        for i, r in enumerate(ranks):
            if i % full_every == 0:
                out.append(None)
            out.append(r)
        return out
    return ranks


class TrainSchedule:
    """What the compressor does at each training step: (latent rank or None, through_latent).

    Steps before `cotrain_start * max_steps` run the language model on the full cache and train
    the compressor on the side alone (side_attn_error), cycling over the trained ranks: no
    gradient of it reaches the model (the global clipping norm still includes it, docs/kv.md).
    From there on, co-training: the rank cycles over
    train_rank_schedule and attention runs through the latent, so the model adapts to each budget
    (at the end of training, where the learning rate is low, so that it costs little)."""

    def __init__(self, num_kv_heads: int, head_dim: int, ratios: list[float], full_every: int,
                 cotrain_start: float, max_steps: int, bits: int = 16, window: int = 0,
                 length: Optional[int] = None, rotary_dims: int = 0):
        self.cotrain = train_rank_schedule(num_kv_heads, head_dim, ratios, full_every, bits, window, length,
                                           rotary_dims)
        self.side = [r for r in self.cotrain if r is not None]
        self.start = int(round(cotrain_start * max_steps))

    def at(self, step: int) -> tuple[Optional[int], bool]:
        """Mode of the step that follows `step` completed steps."""
        if step >= self.start:
            return self.cotrain[(step - self.start) % len(self.cotrain)], True
        return self.side[step % len(self.side)], False


def compressors(model: nn.Module) -> list[LatentKVCompressor]:
    """Every layer's compressor, in layer order; ValueError when the model has none."""
    comps = [m for m in model.modules() if isinstance(m, LatentKVCompressor)]
    if not comps:
        raise ValueError("the model has no learned KV compressor: build it with kv_cfg.compressor='learned'")
    return comps


class KVTrainState:
    """The compressors' mode for the coming forwards, held by whoever trains them (the trainer's
    KV hook, pikv/training/hooks.py; fit_compressors) and handed once to the model's attention
    layers (`attach`); the compressor modules themselves stay free of per-step state.

    rank: the latent rank (None: full K/V, the compressors bypassed). through_latent: True runs
    attention through the latent (co-training, masked evaluation); False runs it on the full K/V
    and trains the latent on the side (LatentKVCompressor.side_attn_error). Each training forward
    with a rank records every layer's attention-output distillation loss here (`record`), keyed
    by layer, so a recomputed forward (activation checkpointing) replaces rather than adds."""

    def __init__(self, comps: list[LatentKVCompressor]):
        self.compressors = comps
        self.rank: Optional[int] = None
        self.through_latent = True
        self._losses: dict[int, torch.Tensor] = {}
        self._replaying = False

    @classmethod
    def attach(cls, model: nn.Module) -> "KVTrainState":
        """A state (full K/V) for `model`'s compressors, handed to its attention layers."""
        state = cls(compressors(model))
        model.set_kv_train_state(state)
        return state

    def set(self, rank: Optional[int], through_latent: bool = True) -> None:
        """Mode of the coming forwards; drops losses recorded under the previous mode."""
        if rank is not None:
            for c in self.compressors:
                c.check_rank(rank)
        self.rank = rank
        self.through_latent = through_latent
        self._losses = {}

    def record(self, layer_idx: int, loss: torch.Tensor) -> None:
        if not self._replaying:
            self._losses[layer_idx] = loss

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """A recomputed forward (activation checkpointing) records nothing: the loss was taken
        from the original forward, and a recomputed copy kept here would hold its graph alive."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def pop_loss(self) -> torch.Tensor:
        """Sum over layers of the recorded distillation losses (then forgotten). Without any (a
        full-cache step) an exact zero that still touches every compressor weight, so they get
        zero gradients rather than none: the optimizer then treats them the same on every step
        and in every process layout (AdamW skips a parameter whose grad is None, while the
        multi-process gradient reducer fills in zeros)."""
        losses, self._losses = list(self._losses.values()), {}
        if losses:
            return torch.stack(losses).sum()
        return sum(0.0 * p.sum() for m in self.compressors for p in m.parameters())
