"""Selection rules: which stored tokens a KV cache keeps (or, for Quest, reads).

Shapes: B batch, N query heads, H heads of a keep set (the kv heads G, or 1 when a storage holds
the kv heads jointly: the learned latent), T new tokens, S stored tokens, M kept tokens, P pages,
D head dim.

A rule scores the stored tokens (or ranks them by position) and keeps the top M per batch row and
keep-set head, always keeping `protect`'s sinks and recent tokens (and at least the storage's
exact tail). Its per-token metadata (positions, scores, last use) lives in the cache's buffers
beside the storage's, is compacted with it and counted in nbytes(). The shape follows kvpress's
presses (`ScorerPress`: a score, then a top-k keep rule), with the rule separate from how the kept
tokens are stored (pikv/kv/storage.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pikv.kv.attention import group_sum
from pikv.kv.budgets import KVOptions


class Selection:
    """Keep everything (the neutral rule)."""
    name = "all"
    evicts = False
    needs_probs = False

    def __init__(self, options: KVOptions):
        self.opt = options

    def min_budget(self) -> int:
        return 1

    def new_meta(self, cache, B: int, H: int, T: int, start: int, device) -> dict[str, torch.Tensor]:
        """Per-token metadata of T new tokens, [B, H, T] each."""
        if not self.evicts:
            return {}
        return {"pos": torch.arange(start, start + T, device=device, dtype=torch.int32).expand(B, H, T)}

    def update(self, cache, li: int, p_BNTS: Optional[torch.Tensor], start: int) -> None:
        """Fold one step's attention probabilities (over stored tokens) into the scores."""

    def protect(self, cache, li: int) -> tuple[int, int]:
        """(sinks, recent): tokens kept by position whatever their score."""
        return 0, cache.budgets[li]

    def scores(self, cache, li: int) -> torch.Tensor:
        """[B, H, S] float64: higher = kept first."""
        raise NotImplementedError

    def read_mask(self, cache, li: int, q_BNTD: torch.Tensor, keys, start: int):
        """Tokens each query reads beside the causal rule ([B,G,T,S] bool) or None: all. keys():
        the stored tokens' keys after RoPE [B,G,S,D] (built only when asked for)."""
        return None


class Window(Selection):
    """The last M tokens (sliding window)."""
    name, evicts = "window", True

    def protect(self, cache, li):
        return 0, cache.budgets[li]

    def scores(self, cache, li):
        return cache.positions(li).double()  # unprotected: the oldest leave first


class Streaming(Window):
    """StreamingLLM (Xiao et al. 2023, arXiv:2309.17453): `sinks` first tokens + the last ones."""
    name = "streaming"

    def min_budget(self):
        return 2

    def protect(self, cache, li):
        M = cache.budgets[li]
        sinks = min(self.opt.sinks, M // 2)
        return sinks, M - sinks


class H2O(Selection):
    """H2O (Zhang et al. 2023, arXiv:2306.14048): attention accumulated over every query so far,
    half of the budget for the heavy hitters and half for the recent tokens."""
    name, evicts, needs_probs = "h2o", True, True

    def min_budget(self):
        return 2

    def new_meta(self, cache, B, H, T, start, device):
        return {**super().new_meta(cache, B, H, T, start, device), "score": self._fill(B, H, T, start, device)}

    def _fill(self, B, H, T, start, device):
        return torch.zeros(B, H, T, device=device)

    def update(self, cache, li, p_BNTS, start):
        score = cache.meta[li].view("score")
        score += group_sum(p_BNTS.float(), score.shape[1])

    def protect(self, cache, li):
        return 0, max(1, int(cache.budgets[li] * self.opt.h2o_recent_fraction))

    def scores(self, cache, li):
        return cache.meta[li].view("score").double()


class SnapKV(H2O):
    """SnapKV (Li et al. 2024, arXiv:2404.14469) exactly as kvpress 0.5.5's SnapKVPress.score: the
    prefill's attention probabilities (softmax over every causal key) of the last w queries on the
    first S - w keys, averaged over those queries, average-pooled over key positions (kernel k,
    zero padding counted), averaged over the keep-set head's query heads; the w window tokens get
    max + 1 so they are always kept. Tokens decoded later score -inf: the recent window keeps them."""
    name = "snapkv"

    def _fill(self, B, H, T, start, device):
        return torch.full((B, H, T), float("-inf") if start > 0 else 0.0, device=device)

    def update(self, cache, li, p_BNTS, start):
        if start == 0:
            score = cache.meta[li].view("score")
            score.copy_(self.snap_scores(p_BNTS, score.shape[1], self.window(cache, li)))

    def snap_scores(self, p_BNTS: torch.Tensor, H: int, window: int) -> torch.Tensor:
        B, N, T, S = p_BNTS.shape
        w = min(window, S - 1)
        if w < 1:  # a single token: nothing to score
            return torch.zeros(B, H, S, device=p_BNTS.device)
        obs_BNS = p_BNTS[:, :, -w:, :S - w].mean(dim=2).float()
        k = self.opt.snap_kernel
        pooled_BNS = F.avg_pool1d(obs_BNS, k, stride=1, padding=k // 2)
        score_BHS = pooled_BNS.view(B, H, N // H, S - w).mean(2)
        return F.pad(score_BHS, (0, w), value=float(score_BHS.detach().max()) + 1)

    def window(self, cache, li: int) -> int:
        """The observation window (make_cache resolved it from the mean budget); a layer whose
        budget is below it uses half its budget."""
        w, M = self.opt.snap_window, cache.budgets[li]
        return w if w <= M else max(1, M // 2)

    def protect(self, cache, li):
        return 0, self.window(cache, li)


class Pyramid(SnapKV):
    """PyramidKV (Cai et al. 2024, arXiv:2406.02069): SnapKV with per-layer budgets (budgets.py)."""
    name = "pyramid"


class LRU(H2O):
    """Least recently used: each step the top `lru_hit_fraction` of the budget by attention mass
    counts as used; the least recently used (older first among ties) is evicted."""
    name = "lru"

    def new_meta(self, cache, B, H, T, start, device):
        return {**Selection.new_meta(self, cache, B, H, T, start, device),
                "used": torch.full((B, H, T), cache.decode_steps, device=device, dtype=torch.int32)}

    def update(self, cache, li, p_BNTS, start):
        used = cache.meta[li].view("used")
        mass_BHS = group_sum(p_BNTS.float(), used.shape[1])
        hits = max(1, int(cache.budgets[li] * self.opt.lru_hit_fraction))
        top_BHK = mass_BHS.topk(min(hits, mass_BHS.shape[-1]), dim=-1).indices
        used.scatter_(2, top_BHK, cache.decode_steps)

    def protect(self, cache, li):
        return 0, 1

    def scores(self, cache, li):
        # older first among ties; a constant multiplier (positions < 2^31, exact in float64) so that
        # scores compare across the ranks of a sharded cache
        used, pos = cache.meta[li].view("used"), cache.positions(li)
        return used.double() * 2.0 ** 31 + pos.double()


class Quest(Selection):
    """Quest (Tang et al. 2024, arXiv:2406.10774): keys in pages with per-channel min/max bounds;
    each decode query reads only the pages with the largest upper bound of q.k (the last, partial
    page always). Frees nothing; the cache's `bytes_read` counts what decode steps read."""
    name = "quest"

    def __init__(self, options: KVOptions):
        super().__init__(options)
        self._final: dict[int, int] = {}  # per layer: tokens whose keys were final at the last bounds update

    def min_budget(self):
        return self.opt.quest_page

    def read_mask(self, cache, li, q_BNTD, keys, start):
        k_BGSD = keys()
        bounds = self._update_bounds(cache, li, k_BGSD)
        if q_BNTD.shape[2] > 1:  # a prefill attends to everything
            return None
        S, page = k_BGSD.shape[2], self.opt.quest_page
        sel_BGP = quest_pages(q_BNTD, bounds, cache.budgets[li] // page)
        keep_BGS = sel_BGP.repeat_interleave(page, dim=2)[:, :, :S]
        kmin = bounds.view("kmin")
        cache.bytes_read += int(keep_BGS.sum()) * cache.stores[li].token_bytes() + 2 * kmin.numel() * kmin.element_size()
        return keep_BGS[:, :, None, :]

    def _update_bounds(self, cache, li, k_BGSD):
        """Page bounds (metadata: stored and counted), recomputed for the pages the new tokens touch."""
        bounds = cache.pages[li]
        page = self.opt.quest_page
        # the last stored page may have grown, and a store may have changed the keys that were not
        # final at the last update (KIVI quantizes its residual's groups after attention)
        first = max(0, min(bounds.n - 1, self._final.get(li, 0) // page))
        self._final[li] = cache.stores[li].final_tokens()
        tail = k_BGSD[:, :, first * page:].float()
        P_new = -(-tail.shape[2] // page)
        pad = P_new * page - tail.shape[2]
        tail = F.pad(tail, (0, 0, 0, pad), value=float("nan")).view(*tail.shape[:2], P_new, page, -1)
        dtype = cache.store_dtype or k_BGSD.dtype
        bounds.n = first
        bounds.write({"kmin": torch.nan_to_num(tail, nan=float("inf")).amin(3).to(dtype),
                      "kmax": torch.nan_to_num(tail, nan=float("-inf")).amax(3).to(dtype)})
        return bounds


def quest_pages(q_BNTD: torch.Tensor, bounds, pages: int) -> torch.Tensor:
    """Quest's read set of one decode query: the `pages` pages (at least 1) with the largest upper
    bound of q.k summed over a kv head's query heads, and the current (last) page: [B, G, P] bool.
    bounds: Buffers of per-page per-channel key bounds kmin/kmax [B, G, P, D]."""
    B, N, _, D = q_BNTD.shape
    kmin, kmax = bounds.view("kmin").float()[:, :, None], bounds.view("kmax").float()[:, :, None]
    G = kmin.shape[1]
    q_BGnD = q_BNTD[:, :, 0].view(B, G, N // G, D).float()
    ub_BGP = torch.maximum(q_BGnD[:, :, :, None, :] * kmin, q_BGnD[:, :, :, None, :] * kmax).sum(-1).sum(2)
    P = ub_BGP.shape[-1]
    ub_BGP[:, :, -1] = float("inf")  # the current page
    top_BGK = ub_BGP.topk(min(P, max(1, pages)), dim=-1).indices
    return torch.zeros(B, G, P, dtype=torch.bool, device=q_BNTD.device).scatter(2, top_BGK, True)


SELECTIONS = {cls.name: cls for cls in (Selection, Window, Streaming, H2O, SnapKV, Pyramid, LRU, Quest)}
