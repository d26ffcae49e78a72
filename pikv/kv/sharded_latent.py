"""The joint learned latent (pikv/kv/storage.py LatentStore) sharded across ranks: a rank keeps the
codes of the tokens at positions p = rank, rank + R, ... once they leave the exact window; the
window itself (the newest W tokens, exact) is replicated, since every rank computes every new
token's keys and values anyway (W tokens: a constant per rank). Each step every rank encodes the
window and the new tokens (E tokens, as one process does: the codes are the same numbers), reads
its own codes and, of the E tokens, the ones at its positions, under the training pass's rule: a
query at q reads token p exactly when q - W < p <= q, through the latent when p <= q - W.

Shapes: R ranks, B batch, G kv heads, T new tokens, S0 codes this rank holds, E window + new
tokens, K keys this rank reads (S0 + E latent, then E exact), D head dim, r latent rank.
"""

from __future__ import annotations

import torch

from pikv.kv.attention import attention_lse, visible
from pikv.kv.mla import MLAStore
from pikv.kv.storage import LatentStore


class ShardedLatentStore(LatentStore):
    """LatentStore holding rank `shard_rank`'s share of the codes (striped over `world` ranks)."""

    def __init__(self, comp, rank: int, dtype, chunk: int = 256, capacity: int = 0, *, shard_rank: int, world: int,
                 fmt=None):
        super().__init__(comp, rank, dtype, chunk, capacity + comp.window, fmt)  # the share's codes + the window
        self.shard_rank, self.world = shard_rank, world
        self.seen = 0  # tokens appended: the position after the newest

    def share(self, dtype, rope, start: int, T: int):
        """What this rank attends for queries start..start+T-1: (k_BGKD after RoPE, v_BGKD,
        mask [T, K]: the training pass's rule, restricted to this rank's positions)."""
        E, S0, device = self._E[0].shape[2], self.buf.n, self._E[0].device
        pos_E = torch.arange(start + T - E, start + T, device=device)
        pos_lat = torch.cat([torch.arange(S0, device=device) * self.world + self.shard_rank, pos_E])
        k_BGKD, v_BGKD, _ = self.read(dtype, rope, pos_lat.expand(self._E[0].shape[0], 1, -1), start, T)
        q_pos = torch.arange(start, start + T, device=device)
        mask_TK, key_pos = visible(q_pos, pos_lat, self.tail), pos_lat
        if self.tail:  # the E tokens again, exactly
            mask_TK = torch.cat([mask_TK, visible(q_pos, pos_E, 0, self.tail)], 1)
            key_pos = torch.cat([pos_lat, pos_E])
        return k_BGKD, v_BGKD, mask_TK & (key_pos % self.world == self.shard_rank)

    def attend_share(self, q_BNTD, rope, start: int, T: int):
        """This rank's partial attention (o_BNTD, lse_BNT), for the log-sum-exp merge."""
        k_BGKD, v_BGKD, mask_TK = self.share(q_BNTD.dtype, rope, start, T)
        o_BNTD, lse_BNT, _ = attention_lse(q_BNTD, k_BGKD, v_BGKD, mask_TK)
        return o_BNTD, lse_BNT

    def append(self, k_pre_BGTD, k_BGTD, v_BGTD, at=None):
        super().append(k_pre_BGTD, k_BGTD, v_BGTD, at)
        self.seen += k_BGTD.shape[2]

    def settle(self):
        """As LatentStore.settle, the codes leaving the window kept at this rank's positions only."""
        k_E, v_E, codes_E = self._E
        E = k_E.shape[2]
        leaving = max(E - self.tail, 0)
        pos = torch.arange(self.seen - E, self.seen - E + leaving)
        mine = (pos % self.world == self.shard_rank).nonzero().flatten().to(k_E.device)  # on the host: no sync
        if mine.numel():
            self.buf.write({name: c.index_select(2, mine) for name, c in codes_E.items()})
        if self.tail:
            self.exact.n = 0
            dtype = self.dtype or k_E.dtype
            self.exact.write({"wk": k_E[:, :, leaving:].to(dtype), "wv": v_E[:, :, leaving:].to(dtype)})
        self._E = None


class ShardedMLAStore(ShardedLatentStore, MLAStore):
    """The decoupled latent's share (MLAStore: codes + rotated key dims), the same layout. A prefill
    reads its keys explicitly (MLAStore.read); a decode step attends in the latent domain
    (MLAStore.absorbed_scores / absorbed_values), its softmax taken over this rank's tokens only
    (its codes, and the E newest at its positions) with the log-sum-exp the merge needs."""

    def attend_share(self, q_BNTD, rope, start: int, T: int):
        if T > 1:
            return super().attend_share(q_BNTD, rope, start, T)
        B, N, _, D = q_BNTD.shape
        E, device = self._E[0].shape[2], q_BNTD.device
        pos_E = torch.arange(start + 1 - E, start + 1, device=device)
        own_K = torch.cat([torch.ones(self.buf.n, dtype=torch.bool, device=device),
                           pos_E % self.world == self.shard_rank])
        s_BGMK = self.absorbed_scores(q_BNTD).float().masked_fill(~own_K, float("-inf"))
        lse_BGM = torch.logsumexp(s_BGMK, dim=-1)
        finite_BGM = lse_BGM.masked_fill(torch.isinf(lse_BGM), 0.0)  # a rank with no token: weights 0
        p_BGMK = torch.exp(s_BGMK - finite_BGM[..., None]).to(q_BNTD.dtype)
        return self.absorbed_values(p_BGMK).view(B, N, 1, D), lse_BGM.view(B, N, 1)
