"""Storage formats: how one layer's kept tokens are held. Exact (the model dtype or fp16), SVD
low rank, the learned latent here; KIVI quantization in pikv/kv/quant.py.

Shapes: B batch, G kv heads, T new tokens, S stored tokens, E the learned latent's exact tokens
(its window + the new ones), K keys read, M kept tokens, D head dim, R rank.

A store writes the new tokens (`append`), gives attention its keys and values (`read`: post-RoPE
keys; the first S keys are one per stored token in stored order, extra keys name their token in
`token_of_key`), finishes a step (`settle`: e.g. quantize the groups leaving KIVI's residual) and
compacts to the tokens a selection keeps (`keep`). Positions are an int (tokens 0..S-1, nothing
evicted) or a [B, H, S] tensor (the selection's `pos`); a low-rank store re-applies RoPE at them.
Fixed weights that do not grow with tokens (SVD bases, the learned compressor) are model
parameters and are not counted in nbytes().
"""

from __future__ import annotations

from typing import Optional

import torch

from pikv.kv.attention import attention, rotate_at, visible
from pikv.kv.buffers import Buffers


class Store:
    """Exact storage: keys after RoPE and values in `dtype` (None: the model's dtype, the plain cache)."""
    joint_heads = False  # True: one keep set for all kv heads (a joint latent cannot drop a head's token alone)
    free_order = True  # slots in any order (a decode step's new token moves into the evicted slot)
    tail = 0  # newest tokens held apart from the rest; selections never evict them

    def __init__(self, dtype: Optional[torch.dtype] = None, chunk: int = 256, capacity: int = 0):
        self.dtype = dtype
        self.buf = Buffers(chunk, capacity)

    def _fields(self, k_pre_BGTD, k_BGTD, v_BGTD) -> dict[str, torch.Tensor]:
        dtype = self.dtype or k_BGTD.dtype
        return {"k": k_BGTD.to(dtype), "v": v_BGTD.to(dtype)}

    def append(self, k_pre_BGTD, k_BGTD, v_BGTD, at: Optional[int] = None) -> None:
        self.buf.write(self._fields(k_pre_BGTD, k_BGTD, v_BGTD), at)

    def read(self, dtype, rope, pos, start: int, T: int):
        """(k_BGKD after RoPE, v_BGKD, token_of_key [K] or None when K = S)."""
        return self.buf.view("k"), self.buf.view("v"), None

    def attend(self, q_BNTD, read, pos, start: int, T: int, extra, need_probs: bool):
        """Attention of the T new queries (at start..start+T-1) over the stored tokens: (o_BNTD,
        probs per stored token [B, N, T, S] or None). `read()` gives `self.read(...)` (computed
        once per step: a selection may have asked for the keys already); `extra` is the
        selection's read mask over stored tokens or None. This reconstructs keys and values and
        attends over them; a store that attends in its compressed domain overrides it."""
        k_BGKD, v_BGKD, token_of_key = read()
        mask = self.read_mask(q_BNTD.device, pos, start, T, extra, token_of_key)
        o_BNTD, p_BNKS = attention(q_BNTD, k_BGKD, v_BGKD, mask, need_probs)
        return o_BNTD, self.probs_per_token(p_BNKS, token_of_key)

    def read_mask(self, device, pos, start: int, T: int, extra, token_of_key):
        """Which of the keys read each query attends: `mask` and the selection's `extra` (per stored
        token, mapped to the keys through token_of_key); None when every key is visible."""
        mask = self.mask(torch.arange(start, start + T, device=device), pos, start, T)
        if extra is not None:
            extra = extra if token_of_key is None else extra.index_select(-1, token_of_key)
            mask = extra if mask is None else mask & extra
        return mask

    def probs_per_token(self, p_BNTK, token_of_key):
        """Probabilities per key -> per stored token [B, N, T, S] (a token read twice, exactly and
        through the latent, sums its two keys)."""
        if p_BNTK is None or token_of_key is None:
            return p_BNTK
        return p_BNTK.new_zeros(*p_BNTK.shape[:3], self.tokens_read()).index_add_(-1, token_of_key, p_BNTK)

    def mask(self, q_pos_T, pos, start: int, T: int):
        """Which keys each query reads: causal over stored positions (None when every key is
        visible: one query after all stored tokens, SDPA's unmasked fast path)."""
        if T == 1:
            return None
        # nothing evicted yet (pos an int): the stored positions are 0..start + T - 1
        return visible(q_pos_T, torch.arange(start + T, device=q_pos_T.device) if isinstance(pos, int) else pos)

    def settle(self) -> None:
        """After attention: move tokens between the store's forms (nothing for exact storage)."""

    def keep(self, idx_BHM: torch.Tensor) -> None:
        self.buf.keep(idx_BHM)

    def move_last(self, slot_BH1: torch.Tensor) -> int:
        """Evict one token per row: the newest token not held apart (`tail`) takes the evicted slot.
        Returns its index in stored order, where the selection's metadata moves it from."""
        src = self.buf.n - 1
        self.buf.move_last(slot_BH1)
        return src

    def shrink(self, capacity: int) -> None:
        self.buf.shrink(capacity)

    def length(self) -> int:
        return self.buf.n

    def tokens_read(self) -> int:
        """Stored tokens a step reads, new ones included (the first keys of `read`, one per token)."""
        return self.length()

    def final_tokens(self) -> int:
        """Leading stored tokens whose keys, as read, will not change (page bounds of them stay valid)."""
        return self.length()

    def nbytes(self) -> int:
        return self.buf.nbytes()

    def token_bytes(self) -> int:
        """Bytes one stored token of one kv head occupies (what a read of it costs)."""
        return sum(x[0, 0, 0].numel() * x.element_size() for x in self.buf.t.values())

    def get(self):
        """Stored (k_BGSD, v_BGSD) views (exact storage)."""
        return self.buf.view("k"), self.buf.view("v")


class SVDStore(Store):
    """Pre-RoPE keys and values projected on calibrated per-head bases (Palu, arXiv:2407.21118;
    Eigen Attention, arXiv:2408.05646): codes [B, G, S, rank] in `dtype`, decoded and rotated at
    their positions when read."""

    def __init__(self, bases, rank: int, dtype, chunk: int = 256, capacity: int = 0):
        super().__init__(dtype, chunk, capacity)
        self.Uk_GDD, self.Uv_GDD = bases
        self.rank = rank

    def _fields(self, k_pre_BGTD, k_BGTD, v_BGTD):
        Uk, Uv = (u.to(k_pre_BGTD.dtype)[..., :self.rank] for u in (self.Uk_GDD, self.Uv_GDD))
        dtype = self.dtype or k_BGTD.dtype
        return {"ck": torch.einsum("bgtd,gdr->bgtr", k_pre_BGTD, Uk).to(dtype),
                "cv": torch.einsum("bgtd,gdr->bgtr", v_BGTD, Uv).to(dtype)}

    def read(self, dtype, rope, pos, start, T):
        Uk, Uv = (u.to(dtype)[..., :self.rank] for u in (self.Uk_GDD, self.Uv_GDD))
        k_pre = torch.einsum("bgsr,gdr->bgsd", self.buf.view("ck").to(dtype), Uk)
        v = torch.einsum("bgsr,gdr->bgsd", self.buf.view("cv").to(dtype), Uv)
        return rotate_at(rope, k_pre, pos), v, None


class LatentStore(Store):
    """The jointly trained latent (pikv/kv/learned.py): the last `window` tokens held exactly
    (pre-RoPE keys, values: the tail), older ones only as latent codes of all kv heads together
    (one keep set per batch row). E = the held tokens plus the new ones; they are encoded each
    step (as in the training pass), and those leaving the window keep only their codes, in `fmt`
    (pikv/kv/latent_codes.py; default: the format the compressor was trained with)."""
    # codes in any order (a code is rotated at its stored position, the decoupled one stores its
    # rotated dims), then the exact tail: a decode step's victim (never the protected tail) takes the
    # newest code, the one that just left the window
    joint_heads = True

    def __init__(self, comp, rank: int, dtype, chunk: int = 256, capacity: int = 0, fmt=None):
        W = comp.window
        super().__init__(dtype, chunk, max(0, capacity - W))  # self.buf: the codes [B, 1, S - W, R]
        self.comp, self.rank, self.tail = comp, rank, W
        self.fmt = fmt or comp.codes
        self.exact = Buffers(max(W, 1), W)  # wk, wv [B, G, <= W, D]
        self._E = None

    def append(self, k_pre_BGTD, k_BGTD, v_BGTD, at=None):
        k_E, v_E = k_pre_BGTD, v_BGTD
        if self.exact.n:
            k_E = torch.cat([self.exact.view("wk").to(k_pre_BGTD.dtype), k_pre_BGTD], 2)
            v_E = torch.cat([self.exact.view("wv").to(v_BGTD.dtype), v_BGTD], 2)
        codes = self.fmt.store(self.comp.encode(k_E, v_E, self.rank), self.dtype or k_BGTD.dtype)
        self._E = (k_E, v_E, {name: c[:, None] for name, c in codes.items()})  # [B, 1, E, .]

    def _latent(self, dtype) -> torch.Tensor:
        """The latent [B, S, r] of every stored token (codes, then this step's E), in `dtype`."""
        names = [name for name in ("c", "c_scale") if name in self._E[2]]
        latent_E = self.fmt.load({name: self._E[2][name][:, 0] for name in names}, dtype, self.rank)
        if not self.buf.n:
            return latent_E
        stored = self.fmt.load({name: self.buf.view(name)[:, 0] for name in names}, dtype, self.rank)
        return torch.cat([stored, latent_E], 1)

    def read(self, dtype, rope, pos, start, T):
        k_lat, v_lat = self.comp.decode(self._latent(dtype))
        return self._and_tail(rotate_at(rope, k_lat, pos), v_lat, lambda k_E: rope(k_E, start + T - k_E.shape[2]))

    def _and_tail(self, k_lat, v_lat, rotate):
        """The keys/values read: the latent's, then (window) the E exact ones, keys after `rotate`."""
        if not self.tail:
            return k_lat, v_lat, None
        k_E, v_E, _ = self._E
        return torch.cat([k_lat, rotate(k_E)], 2), torch.cat([v_lat, v_E], 2), self._token_of_key(k_lat.device)

    def _token_of_key(self, device) -> torch.Tensor:
        S, E = self.tokens_read(), self._E[0].shape[2]
        return torch.cat([torch.arange(S), torch.arange(S - E, S)]).to(device)

    def mask(self, q_pos_T, pos, start, T):
        """A query at p reads token j exactly when p - window < j <= p, through the latent when
        j <= p - window (LatentKVCompressor.attention, the training pass)."""
        if not self.tail:
            return super().mask(q_pos_T, pos, start, T)
        E = self._E[0].shape[2]
        pos_S = torch.arange(start + T, device=q_pos_T.device) if isinstance(pos, int) else pos
        exact_TE = visible(q_pos_T, torch.arange(start + T - E, start + T, device=q_pos_T.device), 0, self.tail)
        latent = visible(q_pos_T, pos_S, self.tail)
        return torch.cat([latent, exact_TE.expand(*latent.shape[:-1], E)], -1)

    def settle(self):
        k_E, v_E, codes_E = self._E
        leaving = max(k_E.shape[2] - self.tail, 0)
        if leaving:
            self.buf.write({name: c[:, :, :leaving] for name, c in codes_E.items()})
        if self.tail:
            dtype = self.dtype or k_E.dtype
            self.exact.n = 0
            self.exact.write({"wk": k_E[:, :, leaving:].to(dtype), "wv": v_E[:, :, leaving:].to(dtype)})
        self._E = None

    def keep(self, idx_B1M):
        """idx over [codes..., exact tail]: the tail is protected, so its last indices are the tail's."""
        self.buf.keep(idx_B1M[:, :, :idx_B1M.shape[2] - self.exact.n])

    def length(self):
        return self.buf.n + self.exact.n

    def tokens_read(self):
        return self.buf.n + self._E[0].shape[2]  # codes, then the window + new tokens (encoded this step)

    def nbytes(self):
        return self.buf.nbytes() + self.exact.nbytes()
