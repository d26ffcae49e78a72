"""Evicting selections under sharding: a global budget of M tokens per layer and keep-set row
(batch row x kv head) split over the ranks of ShardedKVCache (pikv/kv/sharded.py), with the kept
set of one process. docs/kv.md, "Sharded across ranks".

Shapes: R ranks, B batch, N query heads, G kv heads (= the keep-set heads), T new tokens, S tokens
this rank stores (its share, plus the step's new token), M the global budget, D head dim, W the
SnapKV observation window, K hits (LRU).

- A prefill (position 0) is appended on every rank (each computed its keys anyway); each rank
  attends its striped part, the selection's scores are made global (H2O: one all_reduce of each
  rank's part; SnapKV/PyramidKV: every rank scores the W window queries over all keys itself; window,
  streaming, LRU: positions only) and every rank computes the single process's keep set; rank r
  keeps the kept tokens r, r + R, ... in position order.
- Decode steps at the budget evict one token per row, **deferred by one step**, so that a step
  needs one collective (the merge): one process evicts the lowest-scored token after step t's
  attention, which needs step t's merged log-sum-exp. Here, at step t + 1 each rank offers its
  lowest-scored unprotected token (scores and protections as of step t) as a separate partial
  attention beside the partial over the rest, with its (score, position) in the same all_gather;
  every rank picks the global victim (lowest score, the oldest among ties) and merges every
  partial but the victim's: the attention of one process at step t + 1, exactly. The new token then
  takes the victim's slot on the victim's rank. A cache at its budget thus holds M + 1 tokens (the
  victim-to-be), every rank floor or ceil((M + 1) / R) of them.
- LRU's hit set (the top K tokens by this step's attention mass) is a global top-K after the merge:
  a second all_gather of each rank's K largest masses (LRU only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pikv.kv.attention import attention, attention_lse, group_sum, merge_partials, visible
from pikv.kv.selection import LRU, SnapKV


class GlobalBudget:
    """The evicting half of ShardedKVCache (a mixin: it uses the cache's stores, meta, budgets,
    rank/world and `_merge` / `_gather`). `_held[li]`: tokens layer li holds over all ranks."""

    def _append_all(self, li, k_pre_BGTD, k_BGTD, v_BGTD, start):
        store, B, G, T = self.stores[li], *k_BGTD.shape[:3]
        store.append(k_pre_BGTD, k_BGTD, v_BGTD)
        self.meta[li].write(self.selection.new_meta(self, B, G, T, start, k_BGTD.device))
        return self.positions(li)

    # -- prefill ------------------------------------------------------------------------------
    def _prefill_evicting(self, li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope):
        store, T = self.stores[li], k_BGTD.shape[2]
        pos_BGS = self._append_all(li, k_pre_BGTD, k_BGTD, v_BGTD, 0)
        mine_K = torch.arange(self.rank, T, self.world, device=k_BGTD.device)  # this rank's part, striped
        visible_TK = visible(torch.arange(T, device=k_BGTD.device), mine_K)
        k_BGSD, v_BGSD, _ = store.read(q_BNTD.dtype, rope, pos_BGS, 0, T)
        o_BNTD, lse_BNT, s_BNTK = attention_lse(q_BNTD, k_BGSD.index_select(2, mine_K),
                                                v_BGSD.index_select(2, mine_K), visible_TK)
        o_BNTD, lse_BNT = self._merge(o_BNTD, lse_BNT)
        self._prefill_scores(li, q_BNTD, k_BGSD, v_BGSD, mine_K, visible_TK, s_BNTK, lse_BNT)
        store.settle()
        M, (B, G) = self.budgets[li], k_BGTD.shape[:2]
        keep_BGM = (self._global_keep(li, T) if T > M
                    else torch.arange(T, device=k_BGTD.device).expand(B, G, T))
        mine_BGK = keep_BGM[:, :, self.rank::self.world]
        for buf in (store, self.meta[li]):
            buf.keep(mine_BGK)
            buf.shrink(self._capacity[li])
        self._held[li] = min(T, M)
        return o_BNTD

    def _prefill_scores(self, li, q_BNTD, k_BGSD, v_BGSD, mine_K, visible_TK, s_BNTK, lse_BNT) -> None:
        """The selection's scores of every prompt token, the same on every rank."""
        sel, T = self.selection, k_BGSD.shape[2]
        if isinstance(sel, SnapKV):
            # the W window queries over every key (each rank holds them all now): W x T scores
            # instead of a collective; the single process's probabilities up to fp rounding
            W = min(sel.window(self, li), T - 1)
            if W >= 1:
                q_pos = torch.arange(T - W, T, device=k_BGSD.device)
                _, p_BNWT = attention(q_BNTD[:, :, T - W:], k_BGSD, v_BGSD,
                                      visible(q_pos, torch.arange(T, device=k_BGSD.device)), need_probs=True)
                sel.update(self, li, p_BNWT, 0)
        elif sel.needs_probs and not isinstance(sel, LRU):  # H2O (LRU: a prefill hit sets used = 0 = its value)
            # this rank's part scored with the global lse, then summed over ranks (each token scored once)
            p_BNTK = torch.exp(s_BNTK - lse_BNT[..., None]).masked_fill(~visible_TK, 0.0)
            sel.update(self, li, p_BNTK.new_zeros(*p_BNTK.shape[:3], T).index_copy_(-1, mine_K, p_BNTK), 0)
            score_BGS = self.meta[li].view("score")
            total_BGS = score_BGS.contiguous()  # a view of a larger buffer is strided
            dist.all_reduce(total_BGS, group=self.group)
            score_BGS.copy_(total_BGS)

    def _unprotected_scores(self, li: int, last_pos: int) -> torch.Tensor:
        """[B, G, S] float64 scores, +inf where protected (the single process's rule, KVCache._evict,
        for a step whose last token is at `last_pos`)."""
        sinks, recent = self.selection.protect(self, li)
        recent = max(recent, self.stores[li].tail)
        pos_BGS = self.positions(li)
        protected_BGS = (pos_BGS < sinks) | (pos_BGS > last_pos - recent)
        return self.selection.scores(self, li).masked_fill(protected_BGS, float("inf"))

    def _global_keep(self, li: int, T: int) -> torch.Tensor:
        """The single process's keep set after a prefill of T tokens, from scores every rank holds."""
        return self._unprotected_scores(li, T - 1).topk(self.budgets[li], dim=-1).indices.sort(dim=-1).values

    # -- decode -------------------------------------------------------------------------------
    def _decode_evicting(self, li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start):
        store, sel = self.stores[li], self.selection
        pos_BGS = self._append_all(li, k_pre_BGTD, k_BGTD, v_BGTD, start)
        S, owner = store.length(), self._held[li] % self.world  # owner: the rank that reads the new token
        pending = self._held[li] > self.budgets[li]  # the previous step's victim is still held
        k_BGSD, v_BGSD, _ = store.read(q_BNTD.dtype, rope, pos_BGS, start, 1)
        read_BGS = torch.ones(pos_BGS.shape, dtype=torch.bool, device=pos_BGS.device)
        read_BGS[:, :, S - 1] = self.rank == owner
        if pending:  # the previous step's candidates: each row's lowest (score, position) of the old tokens
            slot_BG, key_BG2 = self._candidate(li, start - 1)
            if S > 1:
                read_BGS.scatter_(2, slot_BG[..., None], False)
        o_BNTD, lse_BNT, s_BNTS = attention_lse(q_BNTD, k_BGSD, v_BGSD, read_BGS[:, :, None])
        if pending:
            o_BNTD, lse_BNT, victim_BG = self._merge_but_victim(o_BNTD, lse_BNT, s_BNTS, v_BGSD, slot_BG, key_BG2)
        else:
            o_BNTD, lse_BNT = self._merge(o_BNTD, lse_BNT)
        if sel.needs_probs:
            p_BNTS = torch.exp(s_BNTS - lse_BNT[..., None])
            if isinstance(sel, LRU):  # the tokens one process holds now: those read, and the kept candidates
                held_BGS = read_BGS.scatter(2, slot_BG[..., None], (victim_BG != self.rank)[..., None]) \
                    if pending and S > 1 else read_BGS
                self._lru_hits(li, p_BNTS, held_BGS)
            else:
                sel.update(self, li, p_BNTS, start)
        store.settle()
        last_BG1 = torch.full((*pos_BGS.shape[:2], 1), S - 1, device=pos_BGS.device)
        if pending:  # the new token takes the victim's slot on the victim's rank; the others drop it
            slot_BG1 = torch.where((victim_BG == self.rank)[..., None], slot_BG[..., None], last_BG1)
        else:  # below the budget (or reaching it: the victim is picked next step) the owner keeps it
            self._held[li] += 1
            slot_BG1 = None if self.rank == owner else last_BG1
        if slot_BG1 is not None:
            for buf in (store, self.meta[li]):
                buf.move_last(slot_BG1)
        return o_BNTD

    def _candidate(self, li: int, last_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's lowest-scored unprotected old token of this rank (the new token, last, never),
        the oldest among equal scores: (its slot [B, G], (score, position) [B, G, 2] float64).
        A rank without old tokens offers slot 0 with score +inf (never the victim: some rank holds
        an unprotected token, as one process always does)."""
        score_BGS = self._unprotected_scores(li, last_pos)[:, :, :-1]
        pos_BGS = self.positions(li)[:, :, :-1].double()
        if score_BGS.shape[-1] == 0:
            B, G = score_BGS.shape[:2]
            inf = torch.full((B, G), float("inf"), dtype=torch.float64, device=score_BGS.device)
            return torch.zeros(B, G, dtype=torch.long, device=score_BGS.device), torch.stack([inf, inf], -1)
        low_BG = score_BGS.amin(dim=-1)
        tied_pos_BGS = pos_BGS.masked_fill(score_BGS != low_BG[..., None], float("inf"))
        slot_BG = tied_pos_BGS.argmin(dim=-1)
        return slot_BG, torch.stack([low_BG, pos_BGS.gather(2, slot_BG[..., None])[..., 0]], -1)

    def _merge_but_victim(self, o_BNTD, lse_BNT, s_BNTS, v_BGSD, slot_BG, key_BG2):
        """One all_gather of [o, lse] over the rest, [o, lse] of the candidate alone (its value,
        its logit) and the candidate's (score, position); every rank merges all but the global
        victim's candidate. Returns (o_BNTD, lse_BNT, the victim's rank [B, G])."""
        B, N, T, D = o_BNTD.shape
        G = slot_BG.shape[1]
        heads = N // G
        slot_BN = slot_BG.repeat_interleave(heads, dim=1)
        has_old = s_BNTS.shape[-1] > 1  # else: nothing to offer (key +inf), the partial weighs nothing
        lse_c_BNT = s_BNTS[:, :, 0].gather(2, slot_BN[..., None]) if has_old else torch.full_like(lse_BNT, float("-inf"))
        o_c_BGD = v_BGSD.gather(2, slot_BG[..., None, None].expand(B, G, 1, D))[:, :, 0]
        o_c_BNTD = o_c_BGD.repeat_interleave(heads, dim=1)[:, :, None].float()
        flat = [o_BNTD.float(), lse_BNT, o_c_BNTD, lse_c_BNT, key_BG2.contiguous().view(torch.float32)]
        sizes = [x.numel() for x in flat]
        parts = self._gather(torch.cat([x.flatten() for x in flat])).split(sizes, dim=1)
        R = self.world
        o_R, lse_R, o_c_R, lse_c_R = (p.view(R, *x.shape) for p, x in zip(parts[:4], flat[:4]))
        key_RBG2 = parts[4].contiguous().view(torch.float64).view(R, B, G, 2)
        score_RBG, pos_RBG = key_RBG2[..., 0], key_RBG2[..., 1]
        tied_RBG = score_RBG == score_RBG.amin(dim=0)
        victim_BG = pos_RBG.masked_fill(~tied_RBG, float("inf")).argmin(dim=0)
        is_victim_RBN = torch.arange(R, device=victim_BG.device)[:, None, None] == victim_BG.repeat_interleave(heads, 1)
        lse_c_R = lse_c_R.masked_fill(is_victim_RBN[..., None], float("-inf"))
        o, lse = merge_partials(torch.cat([o_R, o_c_R]), torch.cat([lse_R, lse_c_R]))
        return o, lse, victim_BG

    def _lru_hits(self, li: int, p_BNTS: torch.Tensor, held_BGS: torch.Tensor) -> None:
        """LRU's hit set, a global top-K of this step's attention mass over the tokens one process
        holds (held_BGS: not the victim, the new token on one rank): an all_gather of each rank's K
        largest masses gives the K-th largest of all; this rank's tokens at or above it are used now
        (ties at it: all of them, where one process takes some)."""
        used = self.meta[li].view("used")
        mass_BGS = group_sum(p_BNTS.float(), used.shape[1]).masked_fill(~held_BGS, float("-inf"))
        held = min(self._held[li], self.budgets[li]) + 1  # tokens one process attends at this step
        K = min(max(1, int(self.budgets[li] * self.selection.opt.lru_hit_fraction)), held)
        top_BGK = mass_BGS.topk(min(K, mass_BGS.shape[-1]), dim=-1).values
        top_BGK = torch.nn.functional.pad(top_BGK, (0, K - top_BGK.shape[-1]), value=float("-inf"))
        everyone_RBGK = self._gather(top_BGK.contiguous())
        threshold_BG = everyone_RBGK.permute(1, 2, 0, 3).flatten(2).topk(K, dim=-1).values[..., -1]
        used.masked_fill_(mass_BGS >= threshold_BG[..., None], self.decode_steps)
