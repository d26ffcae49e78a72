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
- evicting selections (`window`, `streaming`, `h2o`, `snapkv`, `pyramid`, `lru`): a global budget
  of M tokens per row, the single process's kept set, every rank holding floor or ceil of M / R
  (+ 1 at the budget: the next victim); one collective per layer and decode step (LRU: two).
  pikv/kv/sharded_budget.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pikv.kv.attention import attention_lse, merge_partials, visible
from pikv.kv.buffers import Buffers
from pikv.kv.cache import KVCache
from pikv.kv.selection import quest_pages
from pikv.kv.sharded_budget import GlobalBudget
from pikv.kv.sharded_latent import ShardedLatentStore

# torch 2.13 renamed all_gather_into_tensor (deprecated there, the only name before)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SHARDED_STORAGES = ("exact", "quant", "svd", "learned")
SHARDED_SELECTIONS = ("all", "quest", "window", "streaming", "h2o", "snapkv", "pyramid", "lru")


def check_shardable(name: str, storage: str, selection: str, prefill_only: bool) -> None:
    """ValueError naming what is not supported under sharding and what is."""
    if storage not in SHARDED_STORAGES or selection not in SHARDED_SELECTIONS:
        raise ValueError(f"kv method {name!r} cannot be sharded across ranks: supported storages "
                         f"{', '.join(SHARDED_STORAGES)}, selections {', '.join(SHARDED_SELECTIONS)} "
                         "(learned: with selection all)")
    if storage == "learned" and selection != "all":
        raise ValueError(f"kv method {name!r}: the sharded learned latent keeps every token (selection 'all'): "
                         "its keep sets are joint over kv heads and its exact window is replicated; "
                         f"selections with learned storage across ranks: all (else: {', '.join(SHARDED_SELECTIONS[2:])} "
                         "with exact, quant or svd storage)")
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
    capacity (M + 1 for an evicting selection: ceil((M + 1) / R), the kept tokens and the next
    victim, + the step's new token)."""
    if evicts:
        return [-(-c // world) + 1 for c in capacity]
    blocks = [-(-c // block) for c in capacity]
    return [-(-b // world) * block for b in blocks]


class ShardedKVCache(GlobalBudget, KVCache):
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
        if isinstance(self.stores[li], ShardedLatentStore):
            o_BNTD = self._attend_latent(li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start)
        elif not self.selection.evicts:
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

    def _attend_latent(self, li, q_BNTD, k_pre_BGTD, k_BGTD, v_BGTD, rope, start):
        """The learned latent's share (pikv/kv/sharded_latent.py): its keys under its mask, merged."""
        store = self.stores[li]
        store.append(k_pre_BGTD, k_BGTD, v_BGTD)
        o_BNTD, _ = self._merge(*store.attend_share(q_BNTD, rope, start, k_BGTD.shape[2]))
        store.settle()
        return o_BNTD

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
