"""KV-cache methods (single storages and selections): exact bytes, budgets at every step, what is
kept, naive references, errors. Compositions: test_kv_compose.py."""

import math

import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.kv import KVCache, KVOptions, calibrate_svd, make_cache, resolve_policy
from pikv.kv.attention import attention
from pikv.kv.budgets import pyramid_budgets, quant_nbytes_per_head, quant_plan
from pikv.kv.quant import KiviStore, dequantize, pack, quantize, unpack
from pikv.kv.selection import SELECTIONS, SnapKV
from pikv.models import Transformer
from pikv.models.generation import generate
from tests.helpers import REORDERED_FP32, latent_single_pass, seeded

L, G, D, N_HEADS = 3, 2, 16, 4
N_TOK, PREFILL = 64, 24
EVICTING = tuple(name for name, cls in SELECTIONS.items() if cls.evicts)


def causal_TS(S, T):
    """Query i of the last T (at position S - T + i) sees keys 0..S - T + i."""
    return torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]


def selection_cache(name, num_layers, budgets, options=None, store=None, dtype=torch.float32):
    """A cache of one selection over exact storage (or `store`), built without a model."""
    opt = options or KVOptions()
    return KVCache(num_layers, selection=SELECTIONS[name](opt), budgets=budgets, options=opt, store_dtype=dtype,
                   store=store)


class PlainReference:
    """Today's plain-cache path before the redesign, written out: concatenate the new keys/values,
    SDPA with the explicit causal mask (None for one query)."""

    def __init__(self):
        self.k, self.v, self.seen = {}, {}, 0

    @property
    def seq_len(self):
        return self.seen

    def attend(self, li, q, k, v, *, k_pre_BGTD, rope, start):
        self.k[li] = torch.cat([self.k[li], k], 2) if li in self.k else k
        self.v[li] = torch.cat([self.v[li], v], 2) if li in self.v else v
        S, T = self.k[li].shape[2], k.shape[2]
        if li == L - 1:  # positions of the next forward continue after this one's tokens
            self.seen += T
        mask = causal_TS(S, T) if T > 1 else None
        return torch.nn.functional.scaled_dot_product_attention(q, self.k[li], self.v[li], attn_mask=mask,
                                                                enable_gqa=True)



def tiny_model(learned: bool = True, latent_bits: int = 8, latent_window: int = 0) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=N_HEADS * D, num_layers=L, num_heads=N_HEADS, num_kv_heads=G,
                      ffn_hidden_size=64, expert_ffn_hidden_size=32, num_experts=4, max_seq_len=N_TOK,
                      rotary_fraction=1.0)  # the joint latent: tests/unit/test_kv_mla.py has the decoupled one
    kv_cfg = KVConfig(compressor="learned", latent_bits=latent_bits, latent_window=latent_window) if learned else None
    return Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=kv_cfg).eval()


def decode(model, x, cache, check=None):
    """Prefill PREFILL tokens, then one token per step; logits [B, steps, V]; check(cache) after each step."""
    out = [model(x[:, :PREFILL], cache)[:, -1]]
    if check:
        check(cache)
    for t in range(PREFILL, x.shape[1] - 1):
        out.append(model(x[:, t:t + 1], cache)[:, -1])
        if check:
            check(cache)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (2, N_TOK), generator=seeded(1))


@pytest.mark.parametrize("policy,tokens_budget", [("full", None), ("window", N_TOK), ("streaming", N_TOK)])
def test_keep_everything_is_bit_identical_to_plain_cache(model, tokens, policy, tokens_budget):
    ref = decode(model, tokens, PlainReference())
    assert torch.equal(decode(model, tokens, KVCache(L)), ref)  # the plain cache: exact (model dtype) x all
    kw = {} if policy == "full" else {"tokens": tokens_budget}
    got = decode(model, tokens, make_cache(policy, model, store_dtype=torch.float32, **kw))
    assert torch.equal(ref, got)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "lru", "quest"])
def test_keep_everything_matches_plain_cache(model, tokens, policy):
    ref = decode(model, tokens, PlainReference())
    got = decode(model, tokens, make_cache(policy, model, tokens=N_TOK, store_dtype=torch.float32))
    torch.testing.assert_close(got, ref, **REORDERED_FP32)  # the policy's own attention kernel


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("ratio", [2, 4])
def test_budget_kept_every_step_and_bytes_really_freed(model, tokens, policy, ratio):
    cache = make_cache(policy, model, ratio=ratio, total_tokens=N_TOK)
    B = tokens.shape[0]
    seen = []

    def check(c):
        for li in range(L):
            S = c.length(li)
            assert S <= c.budgets[li] or c.seq_len <= c.budgets[li]
            assert S == min(c.seq_len, c.budgets[li])
            # exact storage: fp16 K and V + int32 positions (+ fp32 scores / int32 last-use), in
            # buffers of budget + 1 tokens (a decode step's new token before eviction)
            per_token = 2 * D * 2 + 4 + (4 if policy in ("h2o", "snapkv", "pyramid", "lru") else 0)
            layer_bytes = c.stores[li].nbytes() + c.meta[li].nbytes()
            assert layer_bytes == B * G * (c.budgets[li] + 1) * per_token
        seen.append(c.nbytes())

    decode(model, tokens, cache, check)
    assert cache.peak_nbytes == max(seen)
    full = make_cache("full", model, total_tokens=N_TOK)
    decode(model, tokens, full)
    if policy != "pyramid":
        assert full.peak_nbytes / cache.peak_nbytes > ratio * 0.8


def test_streaming_keeps_sinks_and_recent(model, tokens):
    cache = make_cache("streaming", model, tokens=12, options=KVOptions(sinks=4))
    decode(model, tokens, cache)
    last = N_TOK - 2  # the last fed token's position
    for li in range(L):  # slots in any order: a decode step's token takes the evicted one's slot
        pos = cache.positions(li)
        assert pos[0, 0, :4].tolist() == [0, 1, 2, 3]  # the sinks keep their slots
        assert sorted(pos[0, 0].tolist()) == [0, 1, 2, 3] + list(range(last - 7, last + 1))
        assert (pos == pos[:1, :1]).all()


def test_window_keeps_last_tokens(model, tokens):
    cache = make_cache("window", model, tokens=10)
    decode(model, tokens, cache)
    assert sorted(cache.positions(0)[1, 1].tolist()) == list(range(N_TOK - 11, N_TOK - 1))
    assert cache.length(0) == 10


def naive_h2o(q_steps, k_steps, v_steps, budget, recent):
    """Reference H2O for one batch row and kv head group: python lists, one query at a time."""
    keys, vals, pos, score, outs = [], [], [], [], []
    for t, (q_ND, k_D, v_D) in enumerate(zip(q_steps, k_steps, v_steps)):
        keys.append(k_D), vals.append(v_D), pos.append(t), score.append(0.0)
        K, V = torch.stack(keys), torch.stack(vals)
        p_NS = torch.softmax(q_ND @ K.T / math.sqrt(q_ND.shape[-1]), -1)
        outs.append(p_NS @ V)
        score = [s + float(p_NS[:, i].sum()) for i, s in enumerate(score)]
        if len(keys) > budget:
            cands = [i for i in range(len(keys) - recent)]
            drop = min(cands, key=lambda i: score[i])
            for lst in (keys, vals, pos, score):
                del lst[drop]
    return torch.stack(outs), pos


def test_h2o_equals_naive_reference():
    torch.manual_seed(0)
    T, n_per_g, budget = 20, 2, 6
    q = torch.randn(T, n_per_g, D)
    k, v = torch.randn(T, D), torch.randn(T, D)
    cache = selection_cache("h2o", 1, [budget])
    outs = []
    for t in range(T):
        outs.append(cache.attend(0, q[t][None, :, None], k[t][None, None, None], v[t][None, None, None],
                                 k_pre_BGTD=None, rope=None, start=t)[0, :, 0])
    ref_out, ref_pos = naive_h2o(q, k, v, budget, recent=budget // 2)
    torch.testing.assert_close(torch.stack(outs), ref_out, **REORDERED_FP32)
    assert sorted(cache.positions(0)[0, 0].tolist()) == ref_pos  # slots in any order


def test_lru_evicts_least_recently_attended():
    # one kv head, budget 3, hits = 1 per step: the most attended stored token is "used"
    cache = selection_cache("lru", 1, [3], KVOptions(lru_hit_fraction=0.34))
    big = 30.0
    keys = [[big, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    for t, key in enumerate(keys):  # every query points at token 0, which stays "recently used"
        q = torch.tensor([[[[1.0, 0.0]]]])
        cache.attend(0, q, torch.tensor([[[key]]]), torch.zeros(1, 1, 1, 2), k_pre_BGTD=None,
                     rope=None, start=t)
        assert cache.length(0) == min(t + 1, 3)  # budget kept after every step
    assert sorted(cache.positions(0)[0, 0].tolist()) == [0, 3, 4]


def test_quest_reads_less_and_selects_the_matching_page():
    torch.manual_seed(0)
    S, page = 64, 16
    k = torch.randn(1, 1, S, 8) * 0.1
    k[:, :, 20] = 5.0  # page 1 holds the key best aligned with the query
    k[:, :, :16] += 0.5  # page 0 beats the current page on its bound: only the "always read the
    k[:, :, 48:] -= 1.0  # current page" rule selects page 3
    v = torch.randn(1, 1, S, 8)
    cache = selection_cache("quest", 1, [2 * page], KVOptions(quest_page=page))
    kw = dict(k_pre_BGTD=None, rope=None)
    cache.attend(0, torch.zeros(1, 1, S - 1, 8), k[:, :, :-1], v[:, :, :-1], start=0, **kw)
    q = torch.ones(1, 1, 1, 8)
    o = cache.attend(0, q, k[:, :, -1:], v[:, :, -1:], start=S - 1, **kw)
    keep = torch.zeros(1, 1, 1, S, dtype=torch.bool)
    keep[..., 16:32] = True
    keep[..., 48:] = True  # the current page
    ref, _ = attention(q, k, v, keep, need_probs=False)
    torch.testing.assert_close(o, ref)
    assert cache.bytes_read < S * 2 * 8 * 4  # fewer bytes than the whole K/V of the step
    assert cache.nbytes() >= 2 * S * 8 * 4  # nothing freed


@pytest.mark.parametrize("bits", [2, 4])
def test_quant_pack_roundtrip_and_error_bound(bits):
    x = torch.randn(2, 3, 32, 16, generator=seeded(bits))
    codes, scale, zero = quantize(x, bits, dim=2)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    assert pack(codes, bits).numel() == codes.numel() * bits // 8
    err = (dequantize(codes, scale, zero, torch.float32) - x).abs()
    # round to nearest: half a step; min, max and scale are fp16 (2^-11 relative), which moves the
    # clamped end codes by at most (2^bits - 1) * 2^-11 steps (< 1e-2) plus 2^-11 |x| (< 1e-3 here)
    assert (err <= scale.float() / 2 + 1e-2 * scale.float() + 1e-3).all()


def test_quant_cache_bytes_and_accuracy(model, tokens):
    ref = decode(model, tokens, PlainReference())
    for ratio, bits in ((2, 4), (4, 2)):
        cache = make_cache("quant", model, ratio=ratio)
        got = decode(model, tokens, cache)
        assert cache.info["bits"] == bits
        B, S = tokens.shape[0], N_TOK - 1
        nq = (S // 32) * 32  # quantized tokens (residual 0: full groups of 32 only)
        expect = B * G * (nq * D * bits // 8 * 2          # K and V codes
                          + (nq // 32) * D * 2 * 2         # key scale + zero per channel per group
                          + nq * (D // min(32, D)) * 2 * 2  # value scale + zero per token group
                          + 32 * D * 2 * 2)                 # the fp16 residual buffer: residual + group = 32 tokens
        assert cache.nbytes() == L * expect
        assert (got - ref).abs().max() < (0.05 if bits == 4 else 0.5)


def test_quant_plan_meets_the_requested_ratio_with_kivi_residual():
    # SmolLM2 (head dim 64), 1024-token sequences: 4-bit + 128 fp16 tokens at 2x, 2-bit + 32 at 4x
    assert quant_plan(2, 64, 1024) == (4, 128)
    assert quant_plan(4, 64, 1024) == (2, 32)
    # 3x: 4-bit codes (3.2x alone) no longer meet it once the fp16 buffer of a group is counted
    assert quant_plan(3, 64, 1024)[0] == 2 and quant_plan(2.9, 64, 1024)[0] == 4
    assert quant_plan(4, 64) == (2, 0) and quant_plan(2, 64, None, 32, 64) == (4, 64)
    # 5x is not reachable at 1023 tokens (the partial group waits in fp16): the plan is 2-bit without
    # a residual and the measured ratio (4.7x) is what the evaluation reports
    assert quant_plan(5, 64, 1024) == (2, 0) and 4 * 64 * 1023 / quant_nbytes_per_head(1023, 64, 2, 32, 0) < 5
    for r in (2, 3, 4):
        bits, R = quant_plan(r, 64, 1024)
        assert R % 32 == 0 and 0 <= R <= 128
        for n in (1023, 1024):
            assert 4 * 64 * n / quant_nbytes_per_head(n, 64, bits, 32, R) >= r
        if R < 128:  # the largest residual that fits
            assert 4 * 64 * 1023 / quant_nbytes_per_head(1023, 64, bits, 32, R + 32) < r or \
                4 * 64 * 1024 / quant_nbytes_per_head(1024, 64, bits, 32, R + 32) < r


@pytest.mark.parametrize("ratio", [2, 4])
def test_quant_measured_ratio_and_fp16_residual(ratio):
    torch.manual_seed(0)
    Gk, Dh, n_total, prefill = 2, 32, 1024, 900
    bits, R = quant_plan(ratio, Dh, n_total)
    assert R > 0
    cache = KVCache(1, store=lambda li: KiviStore(bits, 32, R))
    k, v = torch.randn(1, Gk, n_total, Dh), torch.randn(1, Gk, n_total, Dh)
    q = torch.randn(1, 4, n_total, Dh)
    kw = dict(k_pre_BGTD=None, rope=None)
    o = cache.attend(0, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], start=0, **kw)
    # the prefill attends to its prompt at full precision (KIVI), then the groups are quantized
    ref, _ = attention(q[:, :, :prefill], k[:, :, :prefill].half(), v[:, :, :prefill].half(),
                       causal_TS(prefill, prefill), need_probs=False)
    torch.testing.assert_close(o, ref)
    for t in range(prefill, n_total - 1):
        cache.attend(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], start=t, **kw)
        fp16 = cache.stores[0].buf.view("k")
        assert R <= fp16.shape[2] < R + 32  # KIVI's residual: the newest R..R+31 tokens stay fp16
        assert torch.equal(fp16[0, :, -1], k[0, :, t].half())
    S = n_total - 1
    assert cache.nbytes() == Gk * quant_nbytes_per_head(S, Dh, bits, 32, R)
    assert Gk * S * 4 * Dh / cache.peak_nbytes >= ratio  # measured ratio meets the requested one


def test_svd_full_rank_is_lossless(model, tokens):
    ref = decode(model, tokens, PlainReference())
    bases = calibrate_svd(model, tokens)
    svd = decode(model, tokens, make_cache("svd", model, ratio=1, svd_bases=bases, store_dtype=torch.float32))
    # a full-rank basis from an fp32 SVD is orthogonal to ~1e-6; three layers amplify that in the logits
    torch.testing.assert_close(svd, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,window", [(16, 0), (8, 0), (8, 8), (4, 0), (4, 8)])
def test_learned_decode_equals_single_pass_and_bytes_fill_the_budget(tokens, bits, window):
    # the jointly trained latent (with `window` recent tokens exact): sequential decoding with the
    # latent cache == the training-time single pass through the compressor, NLL within 1e-4
    model = tiny_model(latent_bits=bits, latent_window=window)
    cache = make_cache("learned", model, ratio=4, total_tokens=N_TOK, store_dtype=torch.float32)
    widths = []
    seq = decode(model, tokens, cache, check=lambda c: widths.append(c.length(0)))
    one_pass, full = latent_single_pass(model, tokens, cache.info["rank"], PREFILL)
    nll = lambda lg: torch.nn.functional.cross_entropy(lg.flatten(0, 1), tokens[:, PREFILL:].flatten())  # noqa: E731
    assert abs(float((nll(seq) - nll(one_pass)).detach())) < 1e-4  # fp32 reordering, averaged NLL ~4.6
    assert float((seq - full).abs().max().detach()) > 1e-3  # the latent is really read
    assert widths == list(range(PREFILL, N_TOK))  # every token kept, as codes or exactly
    C, seen = 2 * G * D, N_TOK - 1
    rank = cache.info["rank"]
    # fp32 codes here / int8 codes + fp16 scale / int4 codes two per byte + an fp16 scale per 32
    per_token = {16: rank * 4, 8: rank + 2, 4: (rank + 1) // 2 + 2 * ((rank + 31) // 32)}[bits]
    exact = window * C * 4  # the window's fp32 keys + values here
    # the codes' buffers are allocated for the N_TOK tokens the cache was made for (seen = N_TOK - 1)
    assert seen < N_TOK and cache.nbytes() == L * tokens.shape[0] * ((N_TOK - window) * per_token + exact)
    if bits == 4:  # 2C/4 = 32 bytes per token hold 56 int4 codes (28 bytes) + 2 scales; 57 would take 33
        # window: (64*32 - 8*128) / 56 = 18.3 bytes hold 32 codes + 1 scale; 33 would take a second (21)
        assert rank == (56 if window == 0 else 32)
    elif window == 0:  # the rank fills the 4x budget of 2C bytes per token: fp16 codes C/4, int8 C/2 - 2
        assert rank == (C // 4 if bits == 16 else C // 2 - 2)
    else:  # the window takes its fp16 bytes off the budget of N_TOK tokens; the codes get the rest
        assert rank == (N_TOK * 2 * C // 4 - window * 2 * C) // (N_TOK - window) - 2
    if bits <= 8:  # measured in the fp16 cache the evaluation uses, against an fp16 full cache of N_TOK tokens
        fp16 = make_cache("learned", model, ratio=4, total_tokens=N_TOK)
        decode(model, tokens, fp16)
        assert L * tokens.shape[0] * N_TOK * 2 * C * 2 / fp16.nbytes() >= 4.0


def kvpress_pyramid_budget(layer, num_layers, q_len, compression_ratio, window, beta):
    """PyramidKVPress.get_layer_budget (kvpress 0.5.5), transcribed from its docstring's formulas."""
    max_capacity_prompt = window + q_len * (1 - compression_ratio)
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (q_len >= max_num >= min_num >= window):
        return max(1, round(q_len * (1 - compression_ratio)))
    return round(max_num - layer * (max_num - min_num) / (num_layers - 1))


@pytest.mark.parametrize("q_len,ratio,layers", [(768, 2, 30), (768, 4, 30), (768, 8, 30), (256, 2, 4),
                                                (4096, 4, 32), (1000, 3, 7)])
def test_pyramid_budgets_equal_kvpress(q_len, ratio, layers):
    mean = q_len / ratio
    ref = [kvpress_pyramid_budget(i, layers, q_len, 1 - 1 / ratio, 64, 20) for i in range(layers)]
    assert pyramid_budgets(mean, layers, 20, 64, q_len) == ref
    if ref[0] != ref[-1]:  # a real pyramid: shrinks with depth, the mean kept up to rounding
        assert ref == sorted(ref, reverse=True) and abs(sum(ref) - layers * mean) < layers / 2
    # SmolLM2 (30 layers), 768-token prompt: a pyramid at 2x only; kvpress falls back to SnapKV at 4x / 8x
    if (q_len, layers) == (768, 30):
        assert (ref[0], ref[-1]) == ((704, 64) if ratio == 2 else (q_len // ratio,) * 2)


def naive_snapkv(q_NSD, k_GSD, window, kernel):
    """SnapKV as kvpress 0.5.5's SnapKVPress.score defines it, one prompt, python loops: the last
    `window` queries' softmax attention (causal, over every key) on the first S - window keys,
    mean over those queries, average pool (zero padding counted), mean over the kv group's query
    heads (query head n reads kv head n // (N / G)); the window gets max + 1. Scores [G][S]."""
    N, S, Dh = q_NSD.shape
    G = k_GSD.shape[0]
    n_rep, n_obs = N // G, S - window
    per_head = []
    for n in range(N):
        k = k_GSD[n // n_rep].double()
        a = [0.0] * n_obs
        for i in range(S - window, S):
            p = torch.softmax(q_NSD[n, i].double() @ k[:i + 1].T / math.sqrt(Dh), -1)
            for j in range(n_obs):
                a[j] += float(p[j]) / window
        half = kernel // 2
        per_head.append([sum(a[t] for t in range(j - half, j + half + 1) if 0 <= t < n_obs) / kernel
                         for j in range(n_obs)])
    scores = [[sum(per_head[g * n_rep + r][j] for r in range(n_rep)) / n_rep for j in range(n_obs)] for g in range(G)]
    top = max(max(row) for row in scores) + 1
    return [row + [top] * window for row in scores]


def prefill_selection(cache, q_BNSD, k_BGSD, v_BGSD):
    for li in range(cache.num_layers):
        cache.attend(li, q_BNSD, k_BGSD, v_BGSD, k_pre_BGTD=None, rope=None, start=0)


@pytest.mark.parametrize("S,window,kernel,budget", [(40, 8, 5, 16), (33, 4, 3, 9), (24, 8, 5, 8)])
def test_snapkv_scores_and_kept_equal_kvpress_reference(S, window, kernel, budget):
    torch.manual_seed(S)
    N, Gk, Dh = 6, 2, 8
    q, k, v = torch.randn(1, N, S, Dh) * 2, torch.randn(1, Gk, S, Dh), torch.randn(1, Gk, S, Dh)
    opt = KVOptions(snap_window=window, snap_kernel=kernel)
    cache = selection_cache("snapkv", 1, [budget], opt)
    ref = naive_snapkv(q[0], k[0], window, kernel)
    score = SnapKV(opt).snap_scores(attention(q, k, v, causal_TS(S, S), True)[1], Gk, cache.selection.window(cache, 0))
    # fp32 pooled attention probabilities vs the float64 reference: a few ulps of values <= 1
    torch.testing.assert_close(score[0].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    prefill_selection(cache, q, k, v)
    for g in range(Gk):  # kvpress: topk(budget) of the scores (the window's max + 1 keeps it)
        kept = sorted(torch.tensor(ref[g]).topk(budget).indices.tolist())
        assert cache.positions(0)[0, g].tolist() == kept
        assert set(range(S - window, S)) <= set(kept)
        torch.testing.assert_close(cache.get(0)[0][0, g], k[0, g, kept])


def test_pyramid_kept_equal_kvpress_reference_per_layer():
    torch.manual_seed(3)
    L_, N, Gk, Dh, S, window, ratio = 4, 4, 2, 8, 96, 8, 2
    budgets = pyramid_budgets(S / ratio, L_, 20, window, S)
    assert budgets == [kvpress_pyramid_budget(i, L_, S, 1 - 1 / ratio, window, 20) for i in range(L_)]
    assert budgets[0] > budgets[-1] >= window
    cache = selection_cache("pyramid", L_, list(budgets), KVOptions(snap_window=window, prefill_only=True))
    q, k, v = torch.randn(1, N, S, Dh) * 2, torch.randn(1, Gk, S, Dh), torch.randn(1, Gk, S, Dh)
    prefill_selection(cache, q, k, v)
    ref = naive_snapkv(q[0], k[0], window, 5)
    for li in range(L_):
        assert cache.length(li) == budgets[li]
        for g in range(Gk):
            assert cache.positions(li)[0, g].tolist() == sorted(torch.tensor(ref[g]).topk(budgets[li]).indices.tolist())


def test_make_cache_resolves_snap_window_and_pyramid_from_the_mean_budget(model):
    # window 64 (kvpress) when the budget holds it, else half the budget (kvpress would assert)
    assert make_cache("snapkv", model, tokens=100).opt.snap_window == 64
    assert make_cache("snapkv", model, tokens=64).opt.snap_window == 32
    c = make_cache("pyramid", model, ratio=2, total_tokens=N_TOK)  # M = 32, window 16, length 64
    assert c.opt.snap_window == 16 and c.budgets == [48, 32, 16]
    c = make_cache("pyramid", model, ratio=4, total_tokens=N_TOK)  # pyramid does not fit: SnapKV
    assert c.budgets == [16] * L


def test_snapkv_decode_keeps_budget_and_recent_window(model, tokens):
    cache = make_cache("snapkv", model, ratio=4, total_tokens=N_TOK)  # M = 16, window 8
    decode(model, tokens, cache)
    last = N_TOK - 2
    for li in range(L):
        pos = cache.positions(li)
        assert pos.shape[2] == 16
        assert (pos.sort(dim=-1).values[:, :, -8:] == torch.arange(last - 7, last + 1, dtype=pos.dtype)).all()


def test_generate_with_policy_runs_and_full_equals_plain(model, tokens):
    plain = generate(model, tokens[:, :8], 20)
    full32 = make_cache("full", model, store_dtype=torch.float32)
    assert torch.equal(generate(model, tokens[:, :8], 20, cache=full32), plain)
    out = model.generate(tokens[:, :8], 20, kv_policy="h2o", kv_ratio=4)
    assert out.shape == (2, 28)


def test_names_aliases_and_errors(model):
    assert resolve_policy("Learned") == "learned" and resolve_policy("quantized") == "quant"
    with pytest.raises(ValueError, match=r"kv policy 'LoRA' is retired: use 'learned' .*moe.kind=pikv"):
        resolve_policy("LoRA")
    for name in ("pyramid", "svd", "lru", "h2o", "quest"):
        assert resolve_policy(name) == name
    with pytest.raises(ValueError, match=r"unknown kv policy 'h3o': allowed are full, window"):
        resolve_policy("h3o")
    with pytest.raises(ValueError, match=r"ratio 0.5 is impossible: must be >= 1"):
        make_cache("h2o", model, ratio=0.5, total_tokens=64)
    with pytest.raises(ValueError, match=r"budget of 8 tokens per layer is impossible for 'quest'"):
        make_cache("quest", model, tokens=8)
    with pytest.raises(ValueError, match=r"ratio 8.0 is impossible for quant"):
        make_cache("quant", model, ratio=8.0)
    with pytest.raises(ValueError, match=r"learned kv rank .* is impossible"):
        make_cache("learned", model, ratio=1)
    with pytest.raises(ValueError, match=r"needs a model trained with kv.compressor=learned"):
        make_cache("learned", tiny_model(learned=False), ratio=4)
    with pytest.raises(ValueError, match=r"token budget 0 is impossible"):
        make_cache("window", model, tokens=0)
