"""KV-cache policies: a per-layer cache that holds only what a policy keeps, with exact byte accounting.

Shapes: B batch, N query heads, G kv heads, T new tokens, S stored tokens, D head dim, R rank,
P pages. Keys are stored after RoPE (their positions are baked in), so evicting never re-rotates;
the low-rank caches (svd, learned) store pre-RoPE codes and rotate the decoded keys at their
known (contiguous) positions.

`PolicyCache.attend` replaces the attention of `pikv.models.transformer.Attention` when a policy
cache is passed to the model: append the new tokens, attend, update the policy's scores from the
real attention weights, evict down to the budget. Between steps every layer holds at most its
budget of tokens; the transient of one step is budget + T tokens (the new tokens attend to
themselves before anything is evicted), and a prefill attends to the whole prompt before it is
compressed (as SnapKV and kvpress do).

`nbytes()` is the storage of every tensor the cache holds: keys/values/codes, positions, scores,
quantization scales and zero points, Quest page bounds. Fixed weights that do not grow with
tokens (SVD bases, the learned compressor) are model parameters and are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pikv.kv.budgets import pyramid_budgets, quant_plan, snap_window_for, token_budget
from pikv.kv.learned import latent_rank
from pikv.kv.quant import dequantize, pack, quantize, unpack

POLICIES = ("full", "window", "streaming", "h2o", "snapkv", "pyramid", "quest", "lru", "quant", "svd", "learned")
# Names users of the original PiKV know (Pyramid / SVD / Quantization compressors, LRU / H2O / QUEST
# caches) and common spellings.
ALIASES = {"quantized": "quant", "quantization": "quant", "kivi": "quant",
           "sliding": "window", "streamingllm": "streaming", "sink": "streaming", "pyramidkv": "pyramid"}
# Names that meant something else here: 'lora' was the learned latent, while LoRA in PiKV means the
# LoRA experts of moe.kind=pikv (one word, one meaning).
RETIRED = {"lora": "'learned' (the jointly trained KV latent; LoRA experts are moe.kind=pikv)"}
EVICTING = ("window", "streaming", "h2o", "snapkv", "pyramid", "lru")
# Policies whose eviction needs the attention weights (computed explicitly instead of by SDPA).
NEEDS_PROBS = ("h2o", "snapkv", "pyramid", "lru")


def resolve_policy(name: str) -> str:
    """Canonical policy name; ValueError naming the value and the allowed names."""
    key = str(name).strip().lower()
    if key in RETIRED:
        raise ValueError(f"kv policy {name!r} is retired: use {RETIRED[key]}")
    key = ALIASES.get(key, key)
    if key not in POLICIES:
        raise ValueError(f"unknown kv policy {name!r}: allowed are {', '.join(POLICIES)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return key


@dataclass
class PolicyOptions:
    sinks: int = 4  # StreamingLLM attention sinks
    h2o_recent_fraction: float = 0.5  # H2O: half heavy hitters, half recent tokens
    # SnapKV / PyramidKV as kvpress 0.5.5 computes them (SnapKVPress / PyramidKVPress defaults):
    # observation window of the last 64 prompt queries (kept, as part of the budget), average pool
    # of kernel 5 over key positions. A budget M <= the window cannot hold it: make_cache then
    # uses a window of M // 2 (`snap_window_for`); kvpress asserts instead.
    snap_window: int = 64
    snap_kernel: int = 5
    pyramid_beta: float = 20.0  # PyramidKV: kvpress's beta (budget of the last layer = mean / beta)
    lru_hit_fraction: float = 0.125  # LRU: the top fraction of the budget by attention counts as "used"
    quest_page: int = 16
    quant_group: int = 32  # tokens per key group (per channel) and channels per value group
    # Recent tokens kept in fp16 beyond the group being filled (KIVI's residual; KIVI uses 128 on
    # 4k-token contexts). None = auto (`quant_plan`): the largest multiple of quant_group up to 128
    # whose bytes still meet the requested ratio at total_tokens (0 when total_tokens is unknown).
    quant_residual: Optional[int] = None
    # Compress the prefill only and let generated tokens accumulate (kvpress's protocol, for the
    # side-by-side bench); the default enforces the budget after every step.
    prefill_only: bool = False


def attention(q_BNTD, k_BGSD, v_BGSD, keep, need_probs: bool):
    """Softmax attention with GQA (kv head g serves query heads g*N/G .. (g+1)*N/G - 1, as HF
    repeat_kv, without the copies). keep: bool [T,S] or [B,G,T,S]
    (True = may attend) or None. Returns (o_BNTD, probs_BNTS or None)."""
    B, N, T, D = q_BNTD.shape
    G = k_BGSD.shape[1]
    S = k_BGSD.shape[2]
    k_BGSD, v_BGSD = k_BGSD.to(q_BNTD.dtype), v_BGSD.to(q_BNTD.dtype)
    if not need_probs:
        if keep is not None and keep.dim() == 4:
            keep = keep.repeat_interleave(N // G, dim=1)
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


def _group_sum(p_BNTS: torch.Tensor, G: int) -> torch.Tensor:
    """Attention mass per stored token and kv head, summed over the group's query heads and the queries: [B,G,S]."""
    B, N, T, S = p_BNTS.shape
    return p_BNTS.view(B, G, N // G, T, S).sum(dim=(2, 3))


class PolicyCache:
    """A per-layer KV cache under one policy and budget. Use with `model(tokens, cache)` or
    `model.generate(..., cache=cache)`; build it with `make_cache`."""

    def __init__(self, policy: str, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 budgets: Optional[list[int]] = None, store_dtype: torch.dtype = torch.float16,
                 options: Optional[PolicyOptions] = None, bits: int = 4, rank: Optional[int] = None,
                 svd_bases: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None):
        self.policy = resolve_policy(policy)
        self.num_layers, self.G, self.D = num_layers, num_kv_heads, head_dim
        self.budgets = budgets
        self.store_dtype = store_dtype
        self.opt = options or PolicyOptions()
        self.bits, self.rank, self.svd_bases = bits, rank, svd_bases
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self._seen = [0] * num_layers
        self._layer_bytes = [0] * num_layers
        self.peak_nbytes = 0
        self.decode_steps = 0
        self.bytes_read = 0  # Quest: bytes of K/V read by decode steps (memory is not freed)
        self.prefill_len = 0

    # ---- interface shared with KVCache ------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self._seen[0]

    def length(self, layer_idx: int) -> int:
        st = self.state[layer_idx]
        if "wk" in st or "c" in st:  # the learned latent: codes + the exact recent window
            return sum(st[key].shape[-2 if key == "wk" else 1] for key in ("c", "wk") if key in st)
        if "k" in st:
            return st["k"].shape[2] + (st["qk_codes"].shape[2] * self.opt.quant_group if "qk_codes" in st else 0)
        if "ck" in st:
            return st["ck"].shape[2]
        return 0

    def nbytes(self) -> int:
        """Bytes resident in every tensor this cache holds (metadata included)."""
        return sum(t.untyped_storage().nbytes() for st in self.state for t in st.values())

    def reset(self) -> None:
        self.__init__(self.policy, self.num_layers, self.G, self.D, budgets=self.budgets,
                      store_dtype=self.store_dtype, options=self.opt, bits=self.bits, rank=self.rank,
                      svd_bases=self.svd_bases)

    # ---- attention ----------------------------------------------------------------------------
    def attend(self, layer_idx: int, q_BNTD, k_BGTD, v_BGTD, *, k_pre_BGTD, rope, start, module):
        """Append T new tokens (keys after RoPE; pre-RoPE keys for low-rank policies), attend, evict."""
        T = k_BGTD.shape[2]
        if layer_idx == 0:
            if start == 0:
                self.prefill_len = T
            elif T == 1:
                self.decode_steps += 1
        p = self.policy
        if p == "learned":
            o = self._attend_latent(self.state[layer_idx], q_BNTD, k_pre_BGTD, v_BGTD, rope, module.kv_compressor)
        elif p == "svd":
            o = self._attend_svd(layer_idx, q_BNTD, k_pre_BGTD, v_BGTD, rope)
        elif p == "quant":
            o = self._attend_quant(layer_idx, q_BNTD, k_BGTD, v_BGTD)
        elif p == "quest":
            o = self._attend_quest(layer_idx, q_BNTD, k_BGTD, v_BGTD, start)
        else:
            o = self._attend_evicting(layer_idx, q_BNTD, k_BGTD, v_BGTD, start)
        self._seen[layer_idx] += T
        self._layer_bytes[layer_idx] = sum(t.untyped_storage().nbytes() for t in self.state[layer_idx].values())
        self.peak_nbytes = max(self.peak_nbytes, sum(self._layer_bytes))
        return o

    @staticmethod
    def _causal_TS(S: int, T: int, device) -> Optional[torch.Tensor]:
        if T == 1:
            return None
        q_pos_T = torch.arange(S - T, S, device=device)
        return torch.arange(S, device=device)[None, :] <= q_pos_T[:, None]

    # -- full / eviction policies
    def _attend_evicting(self, li, q_BNTD, k_BGTD, v_BGTD, start):
        st, p = self.state[li], self.policy
        B, G, T, _ = k_BGTD.shape
        new = {"k": k_BGTD.to(self.store_dtype), "v": v_BGTD.to(self.store_dtype)}
        if p != "full":
            pos = torch.arange(start, start + T, device=k_BGTD.device, dtype=torch.int32)
            new["pos"] = pos.expand(B, G, T).contiguous()
        if p in ("h2o", "snapkv", "pyramid"):
            fill = float("-inf") if (p != "h2o" and start > 0) else 0.0  # SnapKV scores prefill only
            new["score"] = torch.full((B, G, T), fill, device=k_BGTD.device)
        if p == "lru":
            new["used"] = torch.full((B, G, T), self.decode_steps, device=k_BGTD.device, dtype=torch.int32)
        for key, t in new.items():
            st[key] = torch.cat([st[key], t], dim=2) if key in st else t
        if self.opt.prefill_only and start > 0 and p != "full":
            self.budgets[li] += T
        k_BGSD, v_BGSD = st["k"], st["v"]
        S = k_BGSD.shape[2]
        if p == "full" or S == start + T or T == 1:
            # nothing evicted yet (positions 0..S-1 in every row), or one query that may see every
            # stored token: no per-row mask, so decoding takes SDPA's unmasked fast path
            keep = self._causal_TS(S, T, k_BGTD.device)
        else:
            q_pos = torch.arange(start, start + T, device=k_BGTD.device, dtype=torch.int32)
            keep = st["pos"][:, :, None, :] <= q_pos[None, None, :, None]
        o_BNTD, p_BNTS = attention(q_BNTD, k_BGSD, v_BGSD, keep, need_probs=p in NEEDS_PROBS)
        if p == "full":
            return o_BNTD
        if p == "h2o":  # H2O (Zhang et al. 2023): accumulated attention over every query so far
            st["score"] = st["score"] + _group_sum(p_BNTS.float(), G)
        elif p in ("snapkv", "pyramid") and start == 0:
            st["score"] = self._snap_scores(p_BNTS, G, li)
        elif p == "lru":
            mass_BGS = _group_sum(p_BNTS.float(), G)
            hits = max(1, int(self._budget(li) * self.opt.lru_hit_fraction))
            top_BGK = mass_BGS.topk(min(hits, S), dim=-1).indices
            st["used"] = st["used"].scatter(2, top_BGK, self.decode_steps)
        self._evict(li)
        return o_BNTD

    def _snap_scores(self, p_BNTS, G, li) -> torch.Tensor:
        """SnapKV (Li et al. 2024, arXiv:2404.14469) exactly as kvpress 0.5.5's SnapKVPress.score:
        the prefill's attention probabilities (softmax over every causal key) of the last w
        queries on the first S - w keys, averaged over those queries, average-pooled over key
        positions (kernel k, zero padding counted), averaged over the kv group's query heads; the
        w window tokens get max + 1 so they are always kept. [B,G,S]"""
        B, N, T, S = p_BNTS.shape
        w = min(self._snap_window(li), S - 1)
        if w < 1:  # a single token: nothing to score
            return torch.zeros(B, G, S, device=p_BNTS.device)
        obs_BNS = p_BNTS[:, :, -w:, :S - w].mean(dim=2).float()
        k = self.opt.snap_kernel
        pooled_BNS = F.avg_pool1d(obs_BNS, k, stride=1, padding=k // 2)
        score_BGS = pooled_BNS.view(B, G, N // G, S - w).mean(2)
        return F.pad(score_BGS, (0, w), value=float(score_BGS.detach().max()) + 1)

    def _snap_window(self, li: int) -> int:
        """The observation window (make_cache resolved it from the mean budget); a layer whose
        budget is below it (a PolicyCache built directly) uses half its budget."""
        w, M = self.opt.snap_window, self._budget(li)
        return w if w <= M else max(1, M // 2)

    def _budget(self, li: int) -> int:
        return self.budgets[li]

    def _protect(self, li: int, S: int) -> tuple[int, int]:
        """(sinks, recent): tokens kept by position whatever their score."""
        M, p = self._budget(li), self.policy
        if p == "window":
            return 0, M
        if p == "streaming":
            sinks = min(self.opt.sinks, M // 2)
            return sinks, M - sinks
        if p == "h2o":
            return 0, max(1, int(M * self.opt.h2o_recent_fraction))
        if p in ("snapkv", "pyramid"):
            return 0, self._snap_window(li)
        return 0, 1  # lru: the newest token

    def _evict(self, li: int) -> None:
        st = self.state[li]
        S, M = st["k"].shape[2], self._budget(li)
        if S <= M:
            return
        sinks, recent = self._protect(li, S)
        if self.policy in ("window", "streaming"):  # same positions in every row: slices, no scores
            # (basic slicing copies at memory speed; an index tensor takes ATen's generic gather:
            # 214 us per call in the profile of a 1k-token window decode step on CPU)
            for key, t in st.items():
                st[key] = torch.cat([t[:, :, :sinks], t[:, :, S - recent:]], dim=2) if sinks else t[:, :, S - recent:].contiguous()
            return
        B, G = st["k"].shape[:2]
        dev = st["k"].device
        idx_S = torch.arange(S, device=dev)
        if self.policy == "lru":  # least recently used first, older first among ties
            score = st["used"].double() * (S + 1) + idx_S.double()
        else:
            score = st["score"].double()
        protected_S = (st["pos"][0, 0] < sinks) | (idx_S >= S - recent)
        score = score.masked_fill(protected_S, float("inf"))
        keep_BGM = score.topk(M, dim=-1).indices.sort(dim=-1).values
        for key, t in st.items():
            if t.dim() == 4:
                st[key] = t.gather(2, keep_BGM[..., None].expand(-1, -1, -1, t.shape[-1])).contiguous()
            else:
                st[key] = t.gather(2, keep_BGM).contiguous()

    # -- Quest: page-level top-k selection by per-channel min/max bounds
    def _attend_quest(self, li, q_BNTD, k_BGTD, v_BGTD, start):
        """Quest (Tang et al. 2024, arXiv:2406.10774): keys in pages with per-channel min/max;
        each decode query reads only the pages with the largest upper bound of q.k (the last,
        partial page always). Memory is not freed; `bytes_read` counts what each step reads."""
        st = self.state[li]
        B, G, T, D = k_BGTD.shape
        for key, t in (("k", k_BGTD), ("v", v_BGTD)):
            t = t.to(self.store_dtype)
            st[key] = torch.cat([st[key], t], dim=2) if key in st else t
        S, page = st["k"].shape[2], self.opt.quest_page
        P = -(-S // page)
        pad = P * page - S
        k_pad = F.pad(st["k"].float(), (0, 0, 0, pad), value=float("nan"))
        k_BGPpD = k_pad.view(B, G, P, page, D)
        # page bounds (metadata, stored and counted; NaN padding ignored)
        st["kmin"] = torch.nan_to_num(k_BGPpD, nan=float("inf")).amin(3).to(self.store_dtype)
        st["kmax"] = torch.nan_to_num(k_BGPpD, nan=float("-inf")).amax(3).to(self.store_dtype)
        if T > 1:  # prefill attends to everything
            o, _ = attention(q_BNTD, st["k"], st["v"], self._causal_TS(S, T, k_BGTD.device), need_probs=False)
            return o
        N = q_BNTD.shape[1]
        q_BGnD = q_BNTD[:, :, 0].view(B, G, N // G, D).float()
        ub_BGnP = torch.maximum(q_BGnD[:, :, :, None, :] * st["kmin"].float()[:, :, None],
                                q_BGnD[:, :, :, None, :] * st["kmax"].float()[:, :, None]).sum(-1)
        ub_BGP = ub_BGnP.sum(2)
        n_pages = min(P, max(1, self._budget(li) // page))
        ub_BGP[:, :, -1] = float("inf")  # the current page
        top_BGK = ub_BGP.topk(n_pages, dim=-1).indices
        sel_BGP = torch.zeros(B, G, P, dtype=torch.bool, device=k_BGTD.device).scatter(2, top_BGK, True)
        keep_BGS = sel_BGP.repeat_interleave(page, dim=2)[:, :, :S]
        o, _ = attention(q_BNTD, st["k"], st["v"], keep_BGS[:, :, None, :], need_probs=False)
        per_token = 2 * D * st["k"].element_size()
        self.bytes_read += int(keep_BGS.sum()) * per_token + st["kmin"].untyped_storage().nbytes() * 2
        return o

    # -- KIVI-style quantization
    def _attend_quant(self, li, q_BNTD, k_BGTD, v_BGTD):
        """KIVI order: the new tokens are appended in fp16 and attended (a prefill attends to its
        own prompt at full precision, as KIVI and kvpress do), then full groups are quantized."""
        st = self.state[li]
        g, R, bits = self.opt.quant_group, self.opt.quant_residual or 0, self.bits
        for key, t in (("k", k_BGTD), ("v", v_BGTD)):
            t = t.to(self.store_dtype)
            st[key] = torch.cat([st[key], t], dim=2) if key in st else t
        k_BGSD, v_BGSD = self._dequant(st, q_BNTD.dtype)
        S, T = k_BGSD.shape[2], q_BNTD.shape[2]
        o, _ = attention(q_BNTD, k_BGSD, v_BGSD, self._causal_TS(S, T, q_BNTD.device), need_probs=False)
        while st["k"].shape[2] >= R + g:  # quantize the oldest group of g tokens
            k_g, v_g = st["k"][:, :, :g].float(), st["v"][:, :, :g].float()
            B, G, _, D = k_g.shape
            kc, ks, kz = quantize(k_g, bits, dim=2)  # per channel over the group's tokens
            vc, vs, vz = quantize(v_g.view(B, G, g, D // min(g, D), min(g, D)), bits, dim=-1)  # per token
            blocks = {"qk_codes": pack(kc.transpose(2, 3).reshape(B, G, 1, D * g), bits),
                      "qk_scale": ks, "qk_zero": kz,
                      "qv_codes": pack(vc.reshape(B, G, g, D), bits),
                      "qv_scale": vs.view(B, G, g, -1), "qv_zero": vz.view(B, G, g, -1)}
            for key, t in blocks.items():
                st[key] = torch.cat([st[key], t], dim=2) if key in st else t
            st["k"], st["v"] = st["k"][:, :, g:].contiguous(), st["v"][:, :, g:].contiguous()
        return o

    def _dequant(self, st, dtype):
        if "qk_codes" not in st:
            return st["k"], st["v"]
        g, bits = self.opt.quant_group, self.bits
        B, G, nblk, _ = st["qk_codes"].shape
        D = st["k"].shape[-1]
        kc = unpack(st["qk_codes"], bits).view(B, G, nblk, D, g).transpose(3, 4)  # [B,G,nblk,g,D]
        k = dequantize(kc, st["qk_scale"][:, :, :, None], st["qk_zero"][:, :, :, None], dtype)
        k = k.reshape(B, G, nblk * g, D)
        gv = min(g, D)
        vc = unpack(st["qv_codes"], bits).view(B, G, nblk * g, D // gv, gv)
        v = dequantize(vc, st["qv_scale"][..., None], st["qv_zero"][..., None], dtype).view(B, G, nblk * g, D)
        return torch.cat([k, st["k"].to(dtype)], 2), torch.cat([v, st["v"].to(dtype)], 2)

    # -- low-rank: SVD (calibrated) or the jointly trained latent
    def _attend_svd(self, li, q_BNTD, k_pre_BGTD, v_BGTD, rope):
        st = self.state[li]
        Uk_GDR, Uv_GDR = (u.to(q_BNTD.dtype) for u in self.svd_bases[li])
        ck = torch.einsum("bgtd,gdr->bgtr", k_pre_BGTD, Uk_GDR[..., :self.rank]).to(self.store_dtype)
        cv = torch.einsum("bgtd,gdr->bgtr", v_BGTD, Uv_GDR[..., :self.rank]).to(self.store_dtype)
        st["ck"] = torch.cat([st["ck"], ck], dim=2) if "ck" in st else ck
        st["cv"] = torch.cat([st["cv"], cv], dim=2) if "cv" in st else cv
        k_pre_BGSD = torch.einsum("bgsr,gdr->bgsd", st["ck"].to(q_BNTD.dtype), Uk_GDR[..., :self.rank])
        v_BGSD = torch.einsum("bgsr,gdr->bgsd", st["cv"].to(q_BNTD.dtype), Uv_GDR[..., :self.rank])
        S, T = k_pre_BGSD.shape[2], q_BNTD.shape[2]
        k_BGSD = rope(k_pre_BGSD, 0)  # every token kept: stored positions are 0..S-1
        o, _ = attention(q_BNTD, k_BGSD, v_BGSD, self._causal_TS(S, T, q_BNTD.device), need_probs=False)
        return o

    def _attend_latent(self, st, q_BNTD, k_pre_BGTD, v_BGTD, rope, comp):
        """The jointly trained latent (pikv/kv/learned.py): the last comp.window tokens are held
        exactly (pre-RoPE keys, values), older ones only as latent codes. E = the held tokens plus
        the new ones; they are encoded each step (as in the training pass), and those leaving the
        window keep only their codes."""
        if comp is None:
            raise ValueError("kv policy 'learned' needs a model trained with kv.compressor=learned")
        dtype = q_BNTD.dtype
        k_pre_BGED, v_BGED = k_pre_BGTD, v_BGTD
        if "wk" in st:
            k_pre_BGED = torch.cat([st["wk"].to(dtype), k_pre_BGTD], 2)
            v_BGED = torch.cat([st["wv"].to(dtype), v_BGTD], 2)
        codes_E = comp.store(comp.encode(k_pre_BGED, v_BGED, self.rank), self.store_dtype)
        latent_E = comp.load(codes_E, dtype)
        latent_S = torch.cat([comp.load(st, dtype), latent_E], 1) if "c" in st else latent_E
        k_lat_BGSD, v_lat_BGSD = comp.decode(latent_S)
        S, E = latent_S.shape[1], k_pre_BGED.shape[2]
        o = comp.attention(q_BNTD, rope(k_lat_BGSD, 0), v_lat_BGSD, rope(k_pre_BGED, S - E), v_BGED)
        leaving = max(E - comp.window, 0)
        if leaving:  # clones: a slice would keep the whole step's storage resident
            for key, t in codes_E.items():
                st[key] = torch.cat([st[key], t[:, :leaving]], 1) if key in st else t[:, :leaving].clone()
        if comp.window:  # copies, for the same reason
            st["wk"] = k_pre_BGED[:, :, leaving:].to(self.store_dtype, copy=True)
            st["wv"] = v_BGED[:, :, leaving:].to(self.store_dtype, copy=True)
        return o


def min_budget(policy: str, options: PolicyOptions) -> int:
    """The smallest per-layer token budget a policy can keep."""
    return {"window": 1, "streaming": 2, "h2o": 2, "snapkv": 2, "pyramid": 2, "lru": 2,
            "quest": options.quest_page}.get(policy, 1)


def make_cache(policy: str, model, *, ratio: Optional[float] = None, tokens: Optional[int] = None,
               total_tokens: Optional[int] = None, store_dtype: torch.dtype = torch.float16,
               options: Optional[PolicyOptions] = None,
               svd_bases: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None) -> PolicyCache:
    """A PolicyCache for `model` (a pikv Transformer) at a budget: `ratio` (fp16 full bytes /
    kept bytes; token policies keep ceil(total_tokens / ratio) tokens per layer, low-rank ones a
    rank D / ratio (svd) or 2 G D / ratio (learned), quant picks its bit width and fp16 residual
    for total_tokens with `quant_plan`) or `tokens`
    (token policies only). Raises ValueError for an unknown policy or an impossible budget."""
    policy = resolve_policy(policy)
    cfg = model.cfg
    L, G, D = cfg.num_layers, cfg.num_kv_heads, cfg.hidden_size // cfg.num_heads
    opt = options or PolicyOptions()
    kw = dict(store_dtype=store_dtype, options=opt)
    if policy == "full":
        return PolicyCache(policy, L, G, D, **kw)
    if policy in ("quant", "svd", "learned"):
        if tokens is not None or ratio is None:
            raise ValueError(f"kv policy {policy!r} takes a compression ratio, not a token budget (tokens={tokens})")
        if not ratio >= 1:
            raise ValueError(f"kv compression ratio {ratio} is impossible: must be >= 1")
        if policy == "quant":
            bits, residual = quant_plan(ratio, D, total_tokens, opt.quant_group, opt.quant_residual)
            kw["options"] = dataclasses.replace(opt, quant_residual=residual)
            return PolicyCache(policy, L, G, D, bits=bits, **kw)
        if policy == "svd":
            if svd_bases is None:
                raise ValueError("kv policy 'svd' needs calibration bases: svd_bases=calibrate_svd(model, tokens)")
            rank = int(D // ratio)
            if rank < 1:
                raise ValueError(f"kv compression ratio {ratio} is impossible for svd: rank D/ratio < 1 (D={D})")
            return PolicyCache(policy, L, G, D, rank=rank, svd_bases=svd_bases, **kw)
        comp = model.layers[0].self_attn.kv_compressor
        if comp is None:
            raise ValueError("kv policy 'learned' needs a model trained with kv.compressor=learned")
        rank = latent_rank(G, D, ratio, comp.bits, comp.window, total_tokens)
        return PolicyCache(policy, L, G, D, rank=comp.check_rank(rank), **kw)
    M = token_budget(ratio, tokens, total_tokens)
    lo = min_budget(policy, opt)
    if M < lo:
        raise ValueError(f"kv budget of {M} tokens per layer is impossible for {policy!r}: it needs >= {lo}")
    budgets = [M] * L
    if policy in ("snapkv", "pyramid"):  # the observation window, resolved from the mean budget
        kw["options"] = opt = dataclasses.replace(opt, snap_window=snap_window_for(opt.snap_window, M))
        if policy == "pyramid":  # length: the tokens a layer sees (kvpress: the prompt)
            budgets = pyramid_budgets(M, L, opt.pyramid_beta, opt.snap_window, total_tokens, lo)
    return PolicyCache(policy, L, G, D, budgets=budgets, **kw)
