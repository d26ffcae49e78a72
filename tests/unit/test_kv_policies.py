"""KV-cache policies: exact bytes, budgets at every step, what is kept, naive references, errors."""

import math

import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.kv import KVCache, PolicyCache, calibrate_svd, make_cache, resolve_policy
from pikv.kv.learned import set_compressor_rank
from pikv.kv.policies import EVICTING, PolicyOptions, attention, pyramid_budgets
from pikv.kv.quant import dequantize, pack, quantize, unpack
from pikv.models import Transformer
from pikv.models.generation import generate

L, G, D, N_HEADS = 3, 2, 16, 4
N_TOK, PREFILL = 64, 24


def tiny_model(learned: bool = True) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=N_HEADS * D, num_layers=L, num_heads=N_HEADS, num_kv_heads=G,
                      ffn_hidden_size=64, expert_ffn_hidden_size=32, num_experts=4, max_seq_len=N_TOK)
    return Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=KVConfig(compressor="learned") if learned else None).eval()


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
    return torch.randint(0, 96, (2, N_TOK), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("policy,tokens_budget", [("full", None), ("window", N_TOK), ("streaming", N_TOK)])
def test_keep_everything_is_bit_identical_to_plain_cache(model, tokens, policy, tokens_budget):
    ref = decode(model, tokens, KVCache(L))
    kw = {} if policy == "full" else {"tokens": tokens_budget}
    got = decode(model, tokens, make_cache(policy, model, store_dtype=torch.float32, **kw))
    assert torch.equal(ref, got)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "lru", "quest"])
def test_keep_everything_matches_plain_cache(model, tokens, policy):
    ref = decode(model, tokens, KVCache(L))
    got = decode(model, tokens, make_cache(policy, model, tokens=N_TOK, store_dtype=torch.float32))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("ratio", [2, 4])
def test_budget_kept_every_step_and_bytes_really_freed(model, tokens, policy, ratio):
    cache = make_cache(policy, model, ratio=ratio, total_tokens=N_TOK)
    B = tokens.shape[0]
    seen = []

    def check(c):
        for li in range(L):
            st = c.state[li]
            S = c.length(li)
            assert S <= c.budgets[li] or c.seq_len <= c.budgets[li]
            assert S == min(c.seq_len, c.budgets[li])
            # exact storage: fp16 K and V + int32 positions (+ fp32 scores / int32 last-use)
            per_token = 2 * D * 2 + 4 + (4 if policy in ("h2o", "snapkv", "pyramid", "lru") else 0)
            layer_bytes = sum(t.untyped_storage().nbytes() for t in st.values())
            assert layer_bytes == B * G * S * per_token
        seen.append(c.nbytes())

    decode(model, tokens, cache, check)
    assert cache.peak_nbytes == max(seen)
    full = make_cache("full", model)
    decode(model, tokens, full)
    if policy != "pyramid":
        assert full.peak_nbytes / cache.peak_nbytes > ratio * 0.8


def test_streaming_keeps_sinks_and_recent(model, tokens):
    cache = make_cache("streaming", model, tokens=12, options=PolicyOptions(sinks=4))
    decode(model, tokens, cache)
    last = N_TOK - 2  # the last fed token's position
    for li in range(L):
        pos = cache.state[li]["pos"][0, 0].tolist()
        assert pos == [0, 1, 2, 3] + list(range(last - 7, last + 1))
        assert (cache.state[li]["pos"] == cache.state[li]["pos"][:1, :1]).all()


def test_window_keeps_last_tokens(model, tokens):
    cache = make_cache("window", model, tokens=10)
    decode(model, tokens, cache)
    assert cache.state[0]["pos"][1, 1].tolist() == list(range(N_TOK - 11, N_TOK - 1))


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
    cache = PolicyCache("h2o", 1, 1, D, budgets=[budget], store_dtype=torch.float32)
    outs = []
    for t in range(T):
        outs.append(cache.attend(0, q[t][None, :, None], k[t][None, None, None], v[t][None, None, None],
                                 k_pre_BGTD=None, rope=None, start=t, module=None)[0, :, 0])
    ref_out, ref_pos = naive_h2o(q, k, v, budget, recent=budget // 2)
    torch.testing.assert_close(torch.stack(outs), ref_out, atol=1e-5, rtol=1e-5)
    assert cache.state[0]["pos"][0, 0].tolist() == ref_pos


def test_lru_evicts_least_recently_attended():
    # one kv head, budget 3, hits = 1 per step: the most attended stored token is "used"
    cache = PolicyCache("lru", 1, 1, 2, budgets=[3], store_dtype=torch.float32,
                        options=PolicyOptions(lru_hit_fraction=0.34))
    big = 30.0
    keys = [[big, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    for t, key in enumerate(keys):  # every query points at token 0, which stays "recently used"
        q = torch.tensor([[[[1.0, 0.0]]]])
        cache.attend(0, q, torch.tensor([[[key]]]), torch.zeros(1, 1, 1, 2), k_pre_BGTD=None,
                     rope=None, start=t, module=None)
        assert cache.length(0) == min(t + 1, 3)  # budget kept after every step
    assert cache.state[0]["pos"][0, 0].tolist() == [0, 3, 4]


def test_quest_reads_less_and_selects_the_matching_page():
    torch.manual_seed(0)
    S, page = 64, 16
    k = torch.randn(1, 1, S, 8) * 0.1
    k[:, :, 20] = 5.0  # page 1 holds the key best aligned with the query
    k[:, :, :16] += 0.5  # page 0 beats the current page on its bound: only the "always read the
    k[:, :, 48:] -= 1.0  # current page" rule selects page 3
    v = torch.randn(1, 1, S, 8)
    cache = PolicyCache("quest", 1, 1, 8, budgets=[2 * page], store_dtype=torch.float32,
                        options=PolicyOptions(quest_page=page))
    kw = dict(k_pre_BGTD=None, rope=None, module=None)
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
    x = torch.randn(2, 3, 32, 16)
    codes, scale, zero = quantize(x, bits, dim=2)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    assert pack(codes, bits).numel() == codes.numel() * bits // 8
    err = (dequantize(codes, scale, zero, torch.float32) - x).abs()
    assert (err <= scale.float() / 2 + 1e-2 * scale.float() + 1e-3).all()


def test_quant_cache_bytes_and_accuracy(model, tokens):
    ref = decode(model, tokens, KVCache(L))
    for ratio, bits in ((2, 4), (4, 2)):
        cache = make_cache("quant", model, ratio=ratio)
        got = decode(model, tokens, cache)
        assert cache.bits == bits
        B, S = tokens.shape[0], N_TOK - 1
        nq = (S // 32) * 32  # quantized tokens (residual 0: full groups of 32 only)
        expect = B * G * (nq * D * bits // 8 * 2          # K and V codes
                          + (nq // 32) * D * 2 * 2         # key scale + zero per channel per group
                          + nq * (D // min(32, D)) * 2 * 2  # value scale + zero per token group
                          + (S - nq) * D * 2 * 2)           # fp16 residual
        assert cache.nbytes() == L * expect
        assert (got - ref).abs().max() < (0.05 if bits == 4 else 0.5)


def test_lowrank_full_rank_is_lossless_and_learned_decode_equals_single_pass(model, tokens):
    ref = decode(model, tokens, KVCache(L))
    bases = calibrate_svd(model, tokens)
    svd = decode(model, tokens, make_cache("svd", model, ratio=1, svd_bases=bases, store_dtype=torch.float32))
    torch.testing.assert_close(svd, ref, atol=1e-4, rtol=1e-4)
    # the jointly trained latent: sequential decoding with the latent cache == the training-time
    # single pass through the compressor (the masked simulation), NLL within 1e-4
    cache = make_cache("learned", model, ratio=4, store_dtype=torch.float32)
    seq = decode(model, tokens, cache)
    set_compressor_rank(model, cache.rank)
    try:
        with torch.no_grad():
            one_pass = model(tokens[:, :-1])[:, PREFILL - 1:]
    finally:
        set_compressor_rank(model, None)
    nll = lambda lg: torch.nn.functional.cross_entropy(lg.flatten(0, 1), tokens[:, PREFILL:].flatten())  # noqa: E731
    assert abs(float(nll(seq) - nll(one_pass))) < 1e-4
    assert cache.nbytes() == L * tokens.shape[0] * (N_TOK - 1) * cache.rank * 4  # latent only
    assert cache.rank == 2 * G * D // 4


def test_pyramid_budgets_shrink_with_depth_and_sum_exactly():
    b = pyramid_budgets(32, 4, 4.0, 2)
    assert b == sorted(b, reverse=True) and sum(b) == 128 and b[-1] == 8


def test_generate_with_policy_runs_and_full_equals_plain(model, tokens):
    plain = generate(model, tokens[:, :8], 20)
    full32 = make_cache("full", model, store_dtype=torch.float32)
    assert torch.equal(generate(model, tokens[:, :8], 20, cache=full32), plain)
    out = model.generate(tokens[:, :8], 20, kv_policy="h2o", kv_ratio=4)
    assert out.shape == (2, 28)


def test_names_aliases_and_errors(model):
    assert resolve_policy("LoRA") == "learned" and resolve_policy("quantized") == "quant"
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
        make_cache("lora", model, ratio=1)
    with pytest.raises(ValueError, match=r"needs a model trained with kv.compressor=learned"):
        make_cache("learned", tiny_model(learned=False), ratio=4)
    with pytest.raises(ValueError, match=r"token budget 0 is impossible"):
        make_cache("window", model, tokens=0)
