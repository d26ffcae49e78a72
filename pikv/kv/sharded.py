"""The KV cache sharded across ranks: every rank runs the model on the same tokens (the batch is
replicated), stores a share of each layer's tokens, attends over its share, and the partial results
merge exactly by their log-sum-exp (the flash-decoding / ring-attention merge) in one collective per
layer: an all_gather of [o, lse] packed in one tensor. docs/kv.md, "Sharded across ranks".

Shapes: R ranks of the shard group, B batch, N query heads, G kv heads (= the keep-set heads),
T new tokens, S tokens stored on this rank, M kept tokens per layer over all ranks, P pages, D head dim.

Layouts (both keep every rank's share within one token, or one block, of total / R):
- selections that free nothing (`all`, `quest`): position p lives on rank (p // block) % R, round
  robin over blocks. block = KIVI's group for quant storage (a shard's groups are then exactly the
  single process's groups, so the codes are identical), Quest's page for quest (a page lives on one
  rank), else 1 (striped).
- evicting selections (`window`, `streaming`, `h2o`): every rank appends all new tokens (it computed
  their keys anyway) and attends over its own part only. A prefill keeps the global top M by score,
  which every rank computes from the same numbers, and rank r keeps the kept tokens r, r + R, ... in
  position order. A decode step's token is attended by rank (held % R); if the budget is not reached
  it stays there, else the global victim of each row (one all_gather of each rank's lowest-scored
  token) is replaced by the new token on the victim's rank, and the other ranks drop it. Every row
  thus keeps floor or ceil(M / R) tokens on every rank, whichever rows lose which tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pikv.kv.attention import attention_lse, merge_partials, visible
from pikv.kv.buffers import Buffers
from pikv.kv.cache import KVCache
from pikv.kv.selection import quest_pages

# torch 2.13 renamed all_gather_into_tensor (deprecated there, the only name before)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SHARDED_STORAGES = ("exact", "quant", "svd")
SHARDED_SELECTIONS = ("all", "quest", "window", "streaming", "h2o")


def check_shardable(name: str, storage: str, selection: str, prefill_only: bool) -> None:
    """ValueError naming what is not supported under sharding and what is."""
    if storage not in SHARDED_STORAGES or selection not in SHARDED_SELECTIONS:
        raise ValueError(f"kv method {name!r} cannot be sharded across ranks: supported storages "
                         f"{', '.join(SHARDED_STORAGES)}, selections {', '.join(SHARDED_SELECTIONS)} "
                         "(the learned latent's window and SnapKV's pooled, LRU's per-rank hit scores are "
                         "not split exactly)")
    if selection == "quest" and storage != "exact":
        raise ValueError(f"kv method {name!r}: sharded quest (shard-skipping) needs exact storage: every rank "
                         "bounds every page from the keys as computed, which other storages change when read")
    if prefill_only:
        raise ValueError(f"kv method {name!r}: KVOptions.prefill_only is not supported across ranks")


def shard_block(storage: str, selection: str, quant_group: int, quest_page: int) -> int:
    """Tokens per round-robin block of a cache that frees nothing (see the module docstring)."""
    return quant_group if storage == "quant" else quest_page if selection == "quest" else 1


def shard_capacity(capacity: list[int], evicts: bool, world: int, block: int) -> list[int]:
    """Tokens each rank's buffers are allocated for: its largest share of the single process's
    capacity (M + 1 for an evicting selection: ceil(M / R) + the step's new token)."""
    if evicts:
        return [-(-(c - 1) // world) + 1 for c in capacity]
    blocks = [-(-c // block) for c in capacity]
    return [-(-b // world) * block for b in blocks]


class ShardedKVCache(KVCache):
    """A KVCache holding this rank's share of every layer (build with
    `make_cache(..., shard_group=group)`). attend() returns the exact attention output on every
    rank; nbytes() / peak_nbytes are this rank's; bytes_read (quest) this rank's reads;
    skipped_reads counts the (layer, step) attentions this rank skipped (shard-skipping)."""

    def __init__(self, num_layers: int, *, group, block: int = 1, **kwargs):
        self.group, self.block = group, block
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        super().__init__(num_layers, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._held = [0] * self.num_layers  # tokens a layer holds over all ranks
        self.skipped_reads = 0
        self.bounds_bytes_read = 0  # quest: the part of bytes_read that is page bounds (every rank reads all)
        self.full_bytes_read = 0  # quest: what reading every stored token would have cost
        # quest: bounds of every page (not only this rank's), sized for the whole sequence
        page = self.opt.quest_page
        self.pages = [Buffers(max(1, self.chunk_size // page), -(-self._capacity[li] * self.world // page))
                      for li in range(self.num_layers)]

    def attend(self, layer_idx: int, q_BNTD, k_BGTD, v_BGTD, *, k_pre_BGTD=None, rope=None,
               start: int = 0) -> torch.Tensor:
        li, T = layer_idx, k_BGTD.shape[2]
        self._count_step(li, start, T)
        k_pre_BGTD = k_BGTD if k_pre_BGTD is None else k_pre_BGTD
        if not self.selection.evicts:
            o_BNTD = self._attend_blocks(li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start)
        elif T == 1:
            o_BNTD = self._decode_evicting(li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start)
        elif start == 0:
            o_BNTD = self._prefill_evicting(li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope)
        else:
            raise ValueError(f"a sharded {self.name!r} cache takes a prefill at position 0 and then one token "
                             f"per step; got {T} tokens at position {start}")
        self._account(li, T)
        return o_BNTD.to(q_BNTD.dtype)

    # -- the merge: the one collective of a layer's step ---------------------------------------
    def _merge(self, o_BNTD, lse_BNT):
        """All ranks' partial attentions -> (the exact output, its lse), on every rank."""
        packed = torch.cat([o_BNTD.float(), lse_BNT[..., None]], dim=-1)
        parts = self._gather(packed)
        return merge_partials(parts[..., :-1], parts[..., -1])

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """[...] from every rank -> [R, ...] (gloo takes the concatenated form only)."""
        out = x.new_empty(self.world * x.shape[0], *x.shape[1:])
        _all_gather(out, x.contiguous(), group=self.group)
        return out.view(self.world, *x.shape)

    @staticmethod
    def _nothing(q_BNTD):
        """The partial attention of a rank that reads no key: o = 0, lse = -inf."""
        return q_BNTD.new_zeros(q_BNTD.shape), q_BNTD.new_full(q_BNTD.shape[:3], float("-inf"), dtype=torch.float32)

    # -- selections that free nothing: round-robin blocks --------------------------------------
    def _owned(self, start: int, T: int, device) -> torch.Tensor:
        """Indices among the T new tokens (positions start..) of those this rank stores (found on
        the host: no device sync)."""
        pos_T = torch.arange(start, start + T)
        return ((pos_T // self.block) % self.world == self.rank).nonzero().flatten().to(device)

    def local_positions(self, li: int, device=None) -> torch.Tensor:
        """Global positions [S] of the tokens this rank stores for a cache that frees nothing."""
        i = torch.arange(self.stores[li].length(), device=device)
        return ((i // self.block) * self.world + self.rank) * self.block + i % self.block

    def _attend_blocks(self, li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start):
        store, T = self.stores[li], k_BGTD.shape[2]
        own = self._owned(start, T, k_BGTD.device)
        if own.numel():
            store.append(*(x.index_select(2, own) for x in (k_pre_BGTD, k_BGTD, v_BGTD)))
        pos_S = self.local_positions(li, k_BGTD.device)
        keep = None if T == 1 else visible(torch.arange(start, start + T, device=k_BGTD.device), pos_S)
        if self.selection.name == "quest":
            pages = self._quest_read(li, q_BNTD, k_BGTD, start, pos_S)
            keep = keep if pages is None else pages if keep is None else keep & pages
        if pos_S.numel() == 0 or (keep is not None and not bool(keep.any())):
            self.skipped_reads += int(pos_S.numel() > 0)
            o_BNTD, lse_BNT = self._nothing(q_BNTD)
        else:
            B, G, S = *k_BGTD.shape[:2], pos_S.numel()
            k_BGSD, v_BGSD, _ = store.read(q_BNTD.dtype, rope, pos_S.expand(B, G, S), start, T)
            o_BNTD, lse_BNT, _ = attention_lse(q_BNTD, k_BGSD, v_BGSD, keep)
        o_BNTD, _ = self._merge(o_BNTD, lse_BNT)
        store.settle()
        return o_BNTD

    def _quest_read(self, li, q_BNTD, k_BGTD, start: int, pos_S):
        """Shard-skipping: every rank bounds every page (from the new keys, which every rank
        computes), picks the single process's Quest pages, and reads its tokens in them only
        ([B, G, 1, S] bool; None for a prefill, which reads everything)."""
        self._update_bounds(li, k_BGTD, start)
        if q_BNTD.shape[2] > 1:
            return None
        page, bounds = self.opt.quest_page, self.pages[li]
        sel_BGP = quest_pages(q_BNTD, bounds, self.budgets[li] // page)
        keep_BGS = sel_BGP.index_select(2, pos_S // page)
        kmin = bounds.view("kmin")
        bounds_bytes, token_bytes = 2 * kmin.numel() * kmin.element_size(), self.stores[li].token_bytes()
        self.bounds_bytes_read += bounds_bytes
        self.full_bytes_read += keep_BGS.numel() * token_bytes
        self.bytes_read += int(keep_BGS.sum()) * token_bytes + bounds_bytes
        return keep_BGS[:, :, None, :]

    def _update_bounds(self, li: int, k_BGTD, start: int) -> None:
        """Per-channel key min/max of every page, stored keys' dtype (as Quest's bounds), folded
        in as tokens arrive: exact keys never change, so a running min/max is the page's."""
        bounds, page = self.pages[li], self.opt.quest_page
        k = k_BGTD.to(self.store_dtype or k_BGTD.dtype).float()
        first, off = start // page, start % page
        T = k.shape[2]
        pad_end = -(off + T) % page
        x = F.pad(k, (0, 0, off, pad_end), value=float("nan")).view(*k.shape[:2], -1, page, k.shape[-1])
        kmin, kmax = torch.nan_to_num(x, nan=float("inf")).amin(3), torch.nan_to_num(x, nan=float("-inf")).amax(3)
        if off and bounds.n > first:  # the page already begun: fold in its bounds so far
            kmin[:, :, 0] = torch.minimum(kmin[:, :, 0], bounds.view("kmin")[:, :, first].float())
            kmax[:, :, 0] = torch.maximum(kmax[:, :, 0], bounds.view("kmax")[:, :, first].float())
        bounds.n = first
        bounds.write({"kmin": kmin.to(k_BGTD.dtype if self.store_dtype is None else self.store_dtype),
                      "kmax": kmax.to(k_BGTD.dtype if self.store_dtype is None else self.store_dtype)})

    # -- evicting selections: a global budget -------------------------------------------------
    def _append_all(self, li, k_pre_BGTD, k_BGTD, v_BGTD, start):
        store, B, G, T = self.stores[li], *k_BGTD.shape[:3]
        store.append(k_pre_BGTD, k_BGTD, v_BGTD)
        self.meta[li].write(self.selection.new_meta(self, B, G, T, start, k_BGTD.device))
        return self.positions(li)

    def _prefill_evicting(self, li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope):
        store, sel, T = self.stores[li], self.selection, k_BGTD.shape[2]
        pos_BGS = self._append_all(li, k_pre_BGTD, k_BGTD, v_BGTD, 0)
        mine_K = torch.arange(self.rank, T, self.world, device=k_BGTD.device)  # this rank's part, striped
        visible_TK = visible(torch.arange(T, device=k_BGTD.device), mine_K)
        k_BGSD, v_BGSD, _ = store.read(q_BNTD.dtype, rope, pos_BGS, 0, T)
        o_BNTD, lse_BNT, s_BNTK = attention_lse(q_BNTD, k_BGSD.index_select(2, mine_K),
                                                v_BGSD.index_select(2, mine_K), visible_TK)
        o_BNTD, lse_BNT = self._merge(o_BNTD, lse_BNT)
        if sel.needs_probs:  # H2O: scores of this rank's part, then everyone's (each token scored once)
            p_BNTK = torch.exp(s_BNTK - lse_BNT[..., None]).masked_fill(~visible_TK, 0.0)
            sel.update(self, li, p_BNTK.new_zeros(*p_BNTK.shape[:3], T).index_copy_(-1, mine_K, p_BNTK), 0)
            score_BGS = self.meta[li].view("score")
            total_BGS = score_BGS.contiguous()  # a view of a larger buffer is strided
            dist.all_reduce(total_BGS, group=self.group)
            score_BGS.copy_(total_BGS)
        store.settle()
        M, (B, G) = self.budgets[li], k_BGTD.shape[:2]
        keep_BGM = (self._global_keep(li, 0, T) if T > M
                    else torch.arange(T, device=k_BGTD.device).expand(B, G, T))
        mine_BGK = keep_BGM[:, :, self.rank::self.world]
        for buf in (store, self.meta[li]):
            buf.keep(mine_BGK)
            buf.shrink(self._capacity[li])
        self._held[li] = min(T, M)
        return o_BNTD

    def _global_keep(self, li: int, start: int, T: int) -> torch.Tensor:
        """The single process's keep set (KVCache._evict), from scores every rank holds."""
        sinks, recent = self._protected(li)
        pos_BGS = self.positions(li)
        protected_BGS = (pos_BGS < sinks) | (pos_BGS > start + T - 1 - recent)
        score_BGS = self.selection.scores(self, li).masked_fill(protected_BGS, float("inf"))
        return score_BGS.topk(self.budgets[li], dim=-1).indices.sort(dim=-1).values

    def _protected(self, li: int) -> tuple[int, int]:
        sinks, recent = self.selection.protect(self, li)
        return sinks, max(recent, self.stores[li].tail)

    def _decode_evicting(self, li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start):
        store, sel = self.stores[li], self.selection
        pos_BGS = self._append_all(li, k_pre_BGTD, k_BGTD, v_BGTD, start)
        S, owner = store.length(), self._held[li] % self.world
        k_BGSD, v_BGSD, _ = store.read(q_BNTD.dtype, rope, pos_BGS, start, 1)
        # the new token (last) apart: its logit is then the same on every rank, whichever keeps it
        o_new, lse_new, s_new = attention_lse(q_BNTD, k_BGSD[:, :, S - 1:], v_BGSD[:, :, S - 1:], None)
        if S > 1:
            o_BNTD, lse_BNT, s_BNTS = attention_lse(q_BNTD, k_BGSD[:, :, :S - 1], v_BGSD[:, :, :S - 1], None)
        else:
            (o_BNTD, lse_BNT), s_BNTS = self._nothing(q_BNTD), s_new[..., :0]
        if self.rank == owner:
            o_BNTD, lse_BNT = merge_partials(torch.stack([o_BNTD, o_new]), torch.stack([lse_BNT, lse_new]))
        o_BNTD, lse_BNT = self._merge(o_BNTD, lse_BNT)
        if sel.needs_probs:
            sel.update(self, li, torch.exp(torch.cat([s_BNTS, s_new], -1) - lse_BNT[..., None]), start)
        store.settle()
        self._place_new(li, start, owner)
        return o_BNTD

    def _place_new(self, li: int, start: int, owner: int) -> None:
        """The new token (last slot of every rank) stays with one rank per row: its owner while the
        budget is not reached, else the rank of the row's global victim, in the victim's slot."""
        store, S = self.stores[li], self.stores[li].length()
        B, G = self.positions(li).shape[:2]
        last_BG = torch.full((B, G), S - 1, device=self.positions(li).device)
        if self._held[li] < self.budgets[li]:
            self._held[li] += 1
            if self.rank == owner:
                return
            slot_BG = last_BG
        else:
            slot_BG = self._victim_slots(li, start, last_BG)
        for buf in (store, self.meta[li]):
            buf.move_last(slot_BG[..., None])

    def _victim_slots(self, li: int, start: int, last_BG) -> torch.Tensor:
        """Each row's global victim (lowest score, the oldest among ties; protected tokens and the
        new one never): its local slot on the rank that holds it, the new token's slot elsewhere."""
        sinks, recent = self._protected(li)
        pos_BGS = self.positions(li)
        protected_BGS = (pos_BGS < sinks) | (pos_BGS > start - recent)
        protected_BGS[:, :, -1] = True
        score_BGS = self.selection.scores(self, li).masked_fill(protected_BGS, float("inf"))
        low_BG, slot_BG = score_BGS.min(dim=-1)
        mine = torch.stack([low_BG, pos_BGS.gather(2, slot_BG[..., None])[..., 0].double()], dim=-1)
        cands = self._gather(mine)
        score_RBG, pos_RBG = cands[..., 0], cands[..., 1]
        tied_RBG = score_RBG == score_RBG.amin(dim=0)
        victim_BG = pos_RBG.masked_fill(~tied_RBG, float("inf")).argmin(dim=0)
        return torch.where(victim_BG == self.rank, slot_BG, last_BG)
