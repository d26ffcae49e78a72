"""Storage x selection: every pair against a plainly written reference loop, names, the budget split,
measured ratios of compositions, error messages.

The reference keeps, per batch row and keep-set head, a Python list of entries (position, the
entry's keys/values as its storage returns them, score, last use), attends one query head and one
query at a time over the visible entries with an explicit softmax, and evicts by the rule written
out; its storages are round trips written from their formulas (per-token min-max quantization,
KIVI's per-channel groups, projection on the SVD basis, the latent's encode/decode), with RoPE
applied one token at a time by the model's RotaryEmbedding.
"""

import math

import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.kv import KVCache, KVOptions, make_cache, parse_method, resolve_policy
from pikv.kv.latent_codes import dequantize_latent, quantize_latent
from pikv.kv.learned import LatentKVCompressor
from pikv.kv.quant import KiviStore, TokenQuantStore
from pikv.kv.rotated import RotatedQuantStore, rotation_matrix
from pikv.kv.selection import SELECTIONS
from pikv.kv.storage import LatentStore, Store, SVDStore
from pikv.models import Transformer
from pikv.models.transformer import RotaryEmbedding
from tests.helpers import REORDERED_FP32, seeded

B, N, G, D = 2, 4, 2, 16
PREFILL, TOTAL, BUDGET = 20, 44, 12
BITS, GROUP, RESIDUAL, RANK, WINDOW = 4, 16, 8, 6, 3
VALUE_BITS = 2  # rquant's values (keys: BITS): key and value bits apart
OPT = KVOptions(sinks=2, snap_window=4, snap_kernel=3, quest_page=4, quant_group=GROUP, lru_hit_fraction=0.25)
SELECTION_NAMES = tuple(SELECTIONS)


def minmax_roundtrip(x, dim, bits=BITS):
    """KIVI's asymmetric min-max quantization and back (fp16 min / scale), written from its formula."""
    levels = 2 ** bits - 1
    mn = x.amin(dim, keepdim=True).half().float()
    scale = ((x.amax(dim, keepdim=True).half().float() - mn) / levels).clamp_min(1e-8).half().float()
    return torch.round((x - mn) / scale).clamp(0, levels) * scale + mn


class Reference:
    """One layer: per (batch row, keep-set head) a list of entries; see the module docstring."""

    def __init__(self, storage, selection, rope, comp=None, bases=None):
        self.storage, self.selection, self.rope, self.comp, self.bases = storage, selection, rope, comp, bases
        self.H = 1 if storage == "learned" else G
        self.lists = [[[] for _ in range(self.H)] for _ in range(B)]
        self.raw = []  # every token's (pos, k_pre, k, v) [B, G, D]: KIVI quantizes by groups of them
        self.decode_steps = 0

    def rot(self, x_GD, pos):
        return self.rope(x_GD[None, :, None, :], pos)[0, :, 0]

    def stored(self, b, pos, k_pre, k, v):
        """The entry's (keys, values) [G, D] as its storage returns them."""
        if self.storage in ("exact", "quant") and not (self.storage == "quant" and SELECTIONS[self.selection].evicts):
            return k, v  # exact, or KIVI before the token's group is quantized (handled in kivi())
        if self.storage == "quant":  # per token, groups of GROUP channels
            return (minmax_roundtrip(k.view(G, D // GROUP, GROUP), -1).view(G, D),
                    minmax_roundtrip(v.view(G, D // GROUP, GROUP), -1).view(G, D))
        if self.storage == "rquant":  # rotate, per-token codes (one group = the head dim here), rotate back
            R = rotation_matrix(D, OPT.rotation_seed)
            return minmax_roundtrip(k @ R, -1, BITS) @ R.T, minmax_roundtrip(v @ R, -1, VALUE_BITS) @ R.T
        if self.storage == "svd":
            Uk = self.bases[0][:, :, :RANK]
            Uv = self.bases[1][:, :, :RANK]
            kk = torch.stack([k_pre[g] @ Uk[g] @ Uk[g].T for g in range(G)])
            return self.rot(kk, pos), torch.stack([v[g] @ Uv[g] @ Uv[g].T for g in range(G)])
        c = self.comp.encode(k_pre[None, :, None], v[None, :, None], RANK)
        kl, vl = self.comp.decode(dequantize_latent(*quantize_latent(c), torch.float32))
        return self.rot(kl[0, :, 0], pos), vl[0, :, 0]

    def kivi(self, n_before):
        """KIVI: the groups quantized at the previous step's end replace their tokens' entries."""
        groups = max(0, (n_before - RESIDUAL) // GROUP)
        for j in range(groups):
            blk = slice(j * GROUP, (j + 1) * GROUP)
            k = torch.stack([r[2] for r in self.raw[blk]], 2)  # [B, G, GROUP, D]
            v = torch.stack([r[3] for r in self.raw[blk]], 2)
            kq = minmax_roundtrip(k, 2)  # per channel over the group's tokens
            vq = minmax_roundtrip(v.view(B, G, GROUP, D // GROUP, GROUP), -1).view(B, G, GROUP, D)
            for b in range(B):
                for h in range(self.H):
                    for i, e in enumerate(self.lists[b][h][blk]):
                        e["k"], e["v"] = kq[b, :, i], vq[b, :, i]

    def step(self, q, k_pre, k, v, start):
        T = k.shape[2]
        if start > 0 and T == 1:
            self.decode_steps += 1
        n_before = len(self.raw)
        for i in range(T):
            self.raw.append((start + i, k_pre[:, :, i], k[:, :, i], v[:, :, i]))
            for b in range(B):
                ks, vs = self.stored(b, start + i, k_pre[b, :, i], k[b, :, i], v[b, :, i])
                for h in range(self.H):
                    self.lists[b][h].append({"pos": start + i, "k": ks, "v": vs, "ke": k[b, :, i], "ve": v[b, :, i],
                                             "score": 0.0 if (self.selection == "h2o" or start == 0) else -math.inf,
                                             "used": self.decode_steps})
        if self.storage == "quant" and not SELECTIONS[self.selection].evicts:
            self.kivi(n_before)
        out, mass = self.attend(q, start, T)
        self.update(mass, q, start, T)
        self.evict(T)
        return out

    def visible(self, b, h, g, p, T, q_bn, t_in_step):
        """(entry index, key, value) a query at p (the step's t_in_step-th) of kv head g reads."""
        entries = self.lists[b][h]
        pages = self.quest_pages(entries, g, q_bn) if self.selection == "quest" and T == 1 else None
        for j, e in enumerate(entries):
            if e["pos"] > p or (pages is not None and j // OPT.quest_page not in pages):
                continue
            # the learned latent's window; per-token codes read this step's own tokens exactly
            exact = ((self.storage == "learned" and p - e["pos"] < WINDOW)
                     or (self.storage in ("quant", "rquant") and e["pos"] >= p - t_in_step))
            yield j, (e["ke"] if exact else e["k"])[g], (e["ve"] if exact else e["v"])[g]

    def quest_pages(self, entries, g, q_n):
        """Pages with the largest upper bound of q.k over the group's query heads (+ the last page)."""
        page, n_rep = OPT.quest_page, N // G
        P = -(-len(entries) // page)
        ub = []
        for pi in range(P):
            keys = torch.stack([e["k"][g] for e in entries[pi * page:(pi + 1) * page]])
            lo, hi = keys.amin(0), keys.amax(0)
            ub.append(sum(float(torch.maximum(q_n[n] * lo, q_n[n] * hi).sum()) for n in range(g * n_rep, (g + 1) * n_rep)))
        ub[-1] = math.inf
        n_pages = min(P, max(1, BUDGET // page))
        return set(sorted(range(P), key=lambda i: -ub[i])[:n_pages])

    def attend(self, q, start, T):
        out = torch.zeros(B, N, T, D)
        mass = [[[0.0] * len(self.lists[b][h]) for h in range(self.H)] for b in range(B)]
        self.probs = {}
        for b in range(B):
            for n in range(N):
                g = n // (N // G)
                h = g if self.H == G else 0
                for t in range(T):
                    seen = list(self.visible(b, h, g, start + t, T, q[b, :, t], t))
                    s = torch.stack([q[b, n, t] @ kk / math.sqrt(D) for _, kk, _ in seen])
                    p = torch.softmax(s, 0)
                    out[b, n, t] = sum(pi * vv for pi, (_, _, vv) in zip(p, seen))
                    for pi, (j, _, _) in zip(p, seen):
                        mass[b][h][j] += float(pi)
                        self.probs[(b, n, t, j)] = self.probs.get((b, n, t, j), 0.0) + float(pi)
        return out, mass

    def update(self, mass, q, start, T):
        for b in range(B):
            for h in range(self.H):
                entries = self.lists[b][h]
                if self.selection == "h2o":
                    for e, m in zip(entries, mass[b][h]):
                        e["score"] += m
                elif self.selection == "lru":
                    hits = max(1, int(BUDGET * OPT.lru_hit_fraction))
                    for j in sorted(range(len(entries)), key=lambda j: -mass[b][h][j])[:hits]:
                        entries[j]["used"] = self.decode_steps
                elif self.selection in ("snapkv", "pyramid") and start == 0:
                    self.snap(b, h, entries, T)

    def snap(self, b, h, entries, S):
        """SnapKV: the last w queries' probabilities on the first S - w entries, mean over the
        queries, average pool (zero padding counted), mean over the keep-set head's query heads."""
        w, k = min(OPT.snap_window, S - 1), OPT.snap_kernel
        heads = range(N) if self.H == 1 else range(h * N // G, (h + 1) * N // G)
        per_head = []
        for n in heads:
            a = [sum(self.probs.get((b, n, t, j), 0.0) for t in range(S - w, S)) / w for j in range(S - w)]
            per_head.append([sum(a[i] for i in range(j - k // 2, j + k // 2 + 1) if 0 <= i < S - w) / k
                             for j in range(S - w)])
        scores = [sum(col) / len(per_head) for col in zip(*per_head)]
        top = max(scores) + 1
        for e, sc in zip(entries, scores + [top] * w):
            e["score"] = sc

    def protect(self):
        M = BUDGET
        sinks, recent = {"window": (0, M), "streaming": (min(OPT.sinks, M // 2), M - min(OPT.sinks, M // 2)),
                         "h2o": (0, max(1, int(M * OPT.h2o_recent_fraction))), "lru": (0, 1),
                         "snapkv": (0, OPT.snap_window), "pyramid": (0, OPT.snap_window)}[self.selection]
        return sinks, max(recent, WINDOW if self.storage == "learned" else 0)

    def evict(self, T):
        if not SELECTIONS[self.selection].evicts:
            return
        sinks, recent = self.protect()
        for b in range(B):
            for h in range(self.H):
                entries = self.lists[b][h]
                S = len(entries)
                if S <= BUDGET:
                    continue
                protected = [e["pos"] < sinks or j >= S - recent for j, e in enumerate(entries)]
                if self.selection == "lru":
                    key = [e["used"] * (S + 1) + j for j, e in enumerate(entries)]
                elif self.selection in ("window", "streaming"):
                    key = [e["pos"] for e in entries]  # by position: the oldest unprotected leave
                else:
                    key = [e["score"] for e in entries]
                order = sorted((j for j in range(S) if not protected[j]), key=lambda j: (key[j], j))
                drop = set(order[:S - BUDGET])
                self.lists[b][h] = [e for j, e in enumerate(entries) if j not in drop]

    def kept(self, b, h):
        return sorted(e["pos"] for e in self.lists[b][h])


def build(storage, selection, comp, bases):
    if storage == "exact":
        store = Store(torch.float32)
    elif storage == "quant":
        evicts = SELECTIONS[selection].evicts
        store = TokenQuantStore(BITS, GROUP) if evicts else KiviStore(BITS, GROUP, RESIDUAL, torch.float32)
    elif storage == "rquant":
        store = RotatedQuantStore(rotation_matrix(D, OPT.rotation_seed), BITS, GROUP, value_bits=VALUE_BITS)
    elif storage == "svd":
        store = SVDStore(bases, RANK, torch.float32)
    else:
        store = LatentStore(comp, RANK, torch.float32)
    return KVCache(1, selection=SELECTIONS[selection](OPT), budgets=[BUDGET], options=OPT, store_dtype=torch.float32,
                   store=lambda li: store)


def cache_positions(cache, b, h):
    return sorted(cache.positions(0)[b, h].tolist())


@pytest.mark.parametrize("selection", SELECTION_NAMES)
@pytest.mark.parametrize("storage", ["exact", "quant", "rquant", "svd", "learned"])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])  # low-rank stores re-rotate kept keys: partial rotary too
def test_every_storage_x_selection_equals_the_reference_loop(storage, selection, rotary_fraction):
    torch.manual_seed(0)
    rope = RotaryEmbedding(D, TOTAL, 10000.0, rotary_fraction)
    comp = LatentKVCompressor(G, D, 2 * G * D, bits=8, window=WINDOW)
    bases = tuple(torch.linalg.qr(torch.randn(G, D, D))[0] for _ in range(2))
    q = torch.randn(B, N, TOTAL, D, generator=seeded(1)) * 2
    k_pre = torch.randn(B, G, TOTAL, D, generator=seeded(2))
    v = torch.randn(B, G, TOTAL, D, generator=seeded(3))
    k = rope(k_pre, 0)
    cache, ref = build(storage, selection, comp, bases), Reference(storage, selection, rope, comp, bases)
    # a prefill over the budget, decoding (each step's token takes the evicted token's slot), a
    # 3-token chunk in the middle (slots out of position order: a causal mask over kept positions),
    # decoding again
    steps = ([(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, 30)] + [(30, 33)]
             + [(t, t + 1) for t in range(33, TOTAL)])
    with torch.no_grad():
        for a, e in steps:
            sl = slice(a, e)
            got = cache.attend(0, q[:, :, sl], k[:, :, sl], v[:, :, sl], k_pre_BGTD=k_pre[:, :, sl], rope=rope, start=a)
            want = ref.step(q[:, :, sl], k_pre[:, :, sl], k[:, :, sl], v[:, :, sl], a)
            # fp32 attention in another order (SDPA / batched matmuls vs one query at a time)
            torch.testing.assert_close(got, want, **REORDERED_FP32)
            if SELECTIONS[selection].evicts:
                for b in range(B):
                    for h in range(ref.H):
                        assert cache_positions(cache, b, h) == ref.kept(b, h), (a, b, h)
                assert cache.length(0) == min(e, BUDGET)
            else:
                assert cache.length(0) == e


@pytest.mark.parametrize("selection", ["all", "h2o", "snapkv"])
@pytest.mark.parametrize("bits,value_bits", [(5, 3), (6, 4), (7, 5)])
def test_rquant_widths_stored_as_bit_slices_equal_the_reference_loop(bits, value_bits, selection, monkeypatch):
    """Widths that do not divide a byte (two or three bit slices each, pikv/kv/bitslice.py) against the
    same reference loop, whose round trip is min-max at the full width: the slices recombine exactly."""
    monkeypatch.setitem(globals(), "BITS", bits)
    monkeypatch.setitem(globals(), "VALUE_BITS", value_bits)
    test_every_storage_x_selection_equals_the_reference_loop("rquant", selection, 1.0)


def test_names_compose_and_canonicalise():
    assert parse_method("quant+snapkv") == parse_method("KIVI+SnapKV")
    assert resolve_policy("exact+h2o") == "h2o" and resolve_policy("quant+all") == "quant"
    assert resolve_policy("full") == "full" and resolve_policy("exact+all") == "full"
    assert resolve_policy("learned@2+h2o") == "learned@2+h2o" and resolve_policy("svd + window") == "svd+window"
    m = parse_method("quant@5.5+pyramidkv")
    assert (m.storage, m.selection, m.share) == ("quant", "pyramid", 5.5)
    with pytest.raises(ValueError, match=r"unknown kv policy 'h3o' in 'quant\+h3o': allowed are full, window"):
        parse_method("quant+h3o")
    with pytest.raises(ValueError, match=r"must be STORAGE\+SELECTION: storage one of exact, quant, rquant, svd, learned"):
        parse_method("h2o+quant")
    with pytest.raises(ValueError, match=r"a storage share needs a selection"):
        parse_method("quant@4")
    with pytest.raises(ValueError, match=r"storage share 'x' must be a number >= 1"):
        parse_method("svd@x+h2o")
    with pytest.raises(ValueError, match=r"exact storage takes no share"):
        parse_method("exact@2+h2o")
    with pytest.raises(ValueError, match=r"kv policy 'lora' is retired"):
        parse_method("lora+h2o")


def test_rquant_names_carry_a_format_or_a_share():
    m = parse_method("QuaRot:K4V2+snapkv")
    assert (m.storage, m.selection, m.fmt, m.name) == ("rquant", "snapkv", "k4v2g64", "rquant:k4v2g64+snapkv")
    assert resolve_policy("rquant:k8v4g32") == "rquant:k8v4g32" and resolve_policy("rotated@3+h2o") == "rquant@3+h2o"
    with pytest.raises(ValueError, match=r"'quant:k4v2\+h2o': a format \(:k4v2\) is given to rquant storage "
                                         r"\(rquant:k4v2g64\) or learned storage \(learned:b4, b4g16, nf4g16, b8, b16\) only"):
        parse_method("quant:k4v2+h2o")
    with pytest.raises(ValueError, match=r"give rquant a format or a share, not both"):
        parse_method("rquant@4:k4v2+h2o")
    with pytest.raises(ValueError, match=r"quant format 'k9v2' must be kKvV\[gG\]: key and value bits in 1 to 8"):
        parse_method("rquant:k9v2")
    assert parse_method("rquant:k5v4+h2o").fmt == "k5v4g64"  # a width stored as bit slices
    with pytest.raises(ValueError, match=r"'k5v4g4': 5-bit codes pack 8 per byte, so the group of 4 channels must "
                                         r"be a multiple of 8"):
        make_cache("rquant:k5v4g4+h2o", tiny_model(learned=False), ratio=8, total_tokens=64)


def tiny_model(learned=True):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=4 * 16, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                      expert_ffn_hidden_size=32, num_experts=4, max_seq_len=256)
    kv = KVConfig(compressor="learned", latent_bits=8, latent_window=4) if learned else None
    return Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=kv).eval()


@pytest.mark.parametrize("method,ratio", [("quant+h2o", 8), ("quant@5.3+window", 16), ("learned+snapkv", 8),
                                          ("svd+streaming", 8), ("learned@2+lru", 6), ("rquant+h2o", 8),
                                          ("rquant:k4v2+window", 16), ("rquant@2+snapkv", 8), ("rquant:k5v3+h2o", 8)])
def test_composition_splits_the_budget_and_meets_it_in_measured_bytes(method, ratio):
    model = tiny_model()
    total = 256
    x = torch.randint(0, 96, (2, total), generator=seeded(4))
    from pikv.kv import calibrate_svd
    bases = calibrate_svd(model, x[:, :64]) if "svd" in method else None
    full = make_cache("full", model, total_tokens=total)
    cache = make_cache(method, model, ratio=ratio, total_tokens=total, svd_bases=bases)
    with torch.no_grad():
        for c in (full, cache):
            model(x[:, :192], c)
            for t in range(192, total - 1):
                model(x[:, t:t + 1], c)
    m = parse_method(method)
    D_ = 16
    if m.storage == "quant":  # 4-bit (the default) or 2-bit (share >= its 5.33x): fp16 tokens per storage token
        per_token = 2 * D_ * 2 / (2 * D_ * cache.info["bits"] / 8 + 8)
    elif m.storage == "rquant":  # its format's nominal ratio (k4v4 by the split rule; k4v2 named; k8v4 for share 2)
        per_token = cache.info["format"].ratio(D_)
        want = {"rquant+h2o": (4, 4), "rquant:k4v2g64+window": (4, 2), "rquant@2+snapkv": (8, 4),
                "rquant:k5v3g64+h2o": (5, 3)}[m.name]
        assert (cache.info["format"].key_bits, cache.info["format"].value_bits) == want
    elif m.storage == "svd":
        per_token = D_ / cache.info["rank"]
    else:
        per_token = m.share or math.sqrt(ratio)
    # the selection keeps ceil(total / (ratio / storage ratio)) tokens per layer
    assert cache.budgets == [math.ceil(total / (ratio / per_token))] * 2
    measured = full.peak_nbytes / cache.peak_nbytes
    # metadata (positions, scores: 4-8 bytes per token and head), the learned latent's window and
    # the decode step's extra slot cost a share of the requested ratio; the ratio itself is the product
    assert ratio * 0.6 < measured <= ratio * 1.05, measured


def test_learned_default_share_is_raised_to_what_the_trained_rank_holds():
    """sqrt(2) = 1.41x would need a latent rank above the trained max_rank (trained at 2x and 4x):
    the default share rises until max_rank fits, the selection keeping the rest; a ratio whose sqrt
    share leaves no rank keeps its error (lowering the share there would always give rank 1)."""
    model = tiny_model()
    comp = model.layers[0].self_attn.kv_compressor
    total = 256
    with pytest.raises(ValueError, match=r"rank \d+ is impossible: the compressor was trained up to rank"):
        make_cache("learned@1.4142+h2o", model, ratio=2, total_tokens=total)
    cache = make_cache("learned+h2o", model, ratio=2, total_tokens=total)
    assert cache.stores[0].rank == comp.max_rank
    # a share above sqrt(2): the selection keeps more than the sqrt split's ceil(256 / 1.41) = 182
    assert math.ceil(total / math.sqrt(2)) < cache.budgets[0] < total
    full = make_cache("full", model, total_tokens=total)
    x = torch.randint(0, 96, (1, total), generator=seeded(6))
    with torch.no_grad():
        for c in (full, cache):
            model(x[:, :192], c)
            for t in range(192, total - 1):
                model(x[:, t:t + 1], c)
    assert 2 * 0.8 < full.peak_nbytes / cache.peak_nbytes <= 2 * 1.05  # metadata: as the test above
    with pytest.raises(ValueError, match=r"impossible.*allowed: another split, learned@SHARE\+h2o"):
        make_cache("learned+h2o", model, ratio=32, total_tokens=total)


def test_rquant_split_rule_and_its_errors():
    """budgets.rquant_format at SmolLM2's head dim 64: in a composition, the mildest of k8v4 (2.46x),
    k5v4 (3.2x) that leaves the selection <= 2.5x, else k4v4 (3.56x), k8v8 (1.88x) below k8v4; alone, the mildest
    format meeting the ratio; an explicit share, the mildest format reaching it. Head dim 32 (the
    default model, groups of 32): k5v4 is 2.91x, so 8x keeps k4v4 (3.2x, selection 2.5x)."""
    from pikv.kv.budgets import rquant_format
    pick = {r: rquant_format(r, 64, 64).name for r in (2, 3, 4, 5, 6, 7, 8, 16)}
    assert pick == {2: "k8v8g64", 3: "k8v4g64", 4: "k8v4g64", 5: "k8v4g64", 6: "k8v4g64", 7: "k5v4g64",
                    8: "k5v4g64", 16: "k4v4g64"}
    assert {r: rquant_format(r, 32, 32).name for r in (4, 8)} == {4: "k8v4g32", 8: "k4v4g32"}
    assert rquant_format(4, 64, 64, alone=True).name == "k4v2g64" and rquant_format(3, 64, 64, share=3).name == "k5v4g64"
    assert rquant_format(3.5, 64, 64, alone=True).name == "k4v4g64"
    with pytest.raises(ValueError, match=r"rquant ratio 8 is beyond its strongest format \(k2v2g64, 6\.40x\)"):
        rquant_format(8, 64, 64, alone=True)
    model = tiny_model(learned=False)  # head dim 16: k2v2 reaches 4x
    with pytest.raises(ValueError, match=r"kv method 'rquant' at ratio 8: rquant ratio 8 is beyond its strongest"):
        make_cache("rquant", model, ratio=8, total_tokens=64)
    with pytest.raises(ValueError, match=r"kv ratio 1\.2 is impossible for 'rquant\+h2o': storage 'rquant' alone "
                                         r"takes 1\.60x"):
        make_cache("rquant+h2o", model, ratio=1.2, total_tokens=64)
    with pytest.raises(ValueError, match=r"quant format 'k4v4g12': group 12 must divide the head dim 16"):
        make_cache("rquant:k4v4g12+h2o", model, ratio=8, total_tokens=64)


def test_impossible_combinations_name_both_parts():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"kv ratio 2 is impossible for 'quant\+h2o': storage 'quant' alone takes "
                                         r"2\.67x, leaving 0\.75x \(< 1\) for selection 'h2o'; allowed: ratio >= 2\.67"):
        make_cache("quant+h2o", model, ratio=2, total_tokens=64)
    with pytest.raises(ValueError, match=r"quant share 2 is below its mildest format \(4-bit, 2\.67x\)"):
        make_cache("quant@2+h2o", model, ratio=8, total_tokens=64)
    with pytest.raises(ValueError, match=r"'learned\+h2o': storage 'learned' needs a model trained with "
                                         r"kv.compressor=learned .*allowed storages here: exact, quant, rquant, svd"):
        make_cache("learned+h2o", tiny_model(learned=False), ratio=8, total_tokens=64)
    with pytest.raises(ValueError, match=r"'learned@2\+window': selection 'window' keeps 4 tokens per layer, not more "
                                         r"than the learned latent's exact window of 4"):
        make_cache("learned@2+window", model, ratio=32, total_tokens=64)
    with pytest.raises(ValueError, match=r"'learned@1\.4\+snapkv' at ratio 2: storage 'learned' at share 1.40x beside "
                                         r"selection 'snapkv' keeping 45 tokens: learned kv rank .* is impossible"):
        make_cache("learned@1.4+snapkv", model, ratio=2, total_tokens=64)  # the default split raises its share
    with pytest.raises(ValueError, match=r"'svd\+h2o': storage 'svd' needs calibration bases"):
        make_cache("svd+h2o", model, ratio=8, total_tokens=64)
    with pytest.raises(ValueError, match=r"impossible for 'quant\+quest': selection 'quest' needs >= 16"):
        make_cache("quant+quest", model, ratio=16, total_tokens=64)


def test_buffers_are_not_reallocated_while_decoding():
    model = tiny_model()
    x = torch.randint(0, 96, (1, 128), generator=seeded(5))
    for method in ("window", "h2o", "quant+snapkv", "learned+h2o", "full"):
        cache = make_cache(method, model, ratio=4, total_tokens=128)
        with torch.no_grad():
            model(x[:, :64], cache)
            ptrs = [t.data_ptr() for b in cache.stores + cache.meta for t in getattr(b, "buf", b).t.values()]
            for t in range(64, 127):
                model(x[:, t:t + 1], cache)
        assert [t.data_ptr() for b in cache.stores + cache.meta for t in getattr(b, "buf", b).t.values()] == ptrs, method


def test_composed_names_work_wherever_a_method_name_does():
    from pikv.eval.kv import parse_specs
    assert parse_specs("KIVI+SnapKV, h2o", "4,8") == [("quant+snapkv", 4.0), ("quant+snapkv", 8.0), ("h2o", 4.0),
                                                     ("h2o", 8.0)]
    with pytest.raises(ValueError, match=r"unknown kv policy 'h3o' in 'quant\+h3o'"):
        parse_specs("quant+h3o", "4")
    model = tiny_model()
    prompt = torch.randint(0, 96, (2, 8), generator=seeded(6))
    out = model.generate(prompt, 40, kv_policy="learned+h2o", kv_ratio=4)
    assert out.shape == (2, 48) and torch.equal(out[:, :8], prompt)
