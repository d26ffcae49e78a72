"""The KV cache sharded across ranks (pikv/kv/sharded.py): with 2 and 4 forked gloo processes the
model's logits equal the single-process cache's within 1e-5 and greedy generation gives the same
tokens (full cache, window and H2O with a global budget, KIVI and per-token quantization, SVD,
Quest shard-skipping);
each rank holds its share of the bytes; the merge is the softmax over the concatenation; one
collective per layer and step. The single-process reference is computed in the parent."""

import pytest
import torch
import torch.distributed as dist

import pikv.kv.sharded as sharded
from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.kv import KVOptions, calibrate_svd, make_cache
from pikv.kv.attention import attention, attention_lse, merge_partials
from pikv.models import Transformer
from pikv.models.generation import generate
from pikv.testing import run_distributed
from tests.helpers import REORDERED_FP32, seeded

L, G, N_HEADS, D, V = 2, 2, 4, 16, 96
PREFILL, TOTAL = 40, 72  # prompt, then one token per step up to TOTAL
NEW_TOKENS = 8  # greedy generation after the prompt

CASES = {  # policy -> make_cache budget (the evicting budgets are below the prompt: the prefill evicts)
    "full": {},
    "window": {"tokens": 24},
    "h2o": {"tokens": 24},
    # KIVI with no fp16 residual: a shard's groups of 32 tokens are the single process's
    "quant": {"ratio": 3, "options": KVOptions(quant_residual=0)},
    "quest": {"tokens": 32},
    "quant+h2o": {"tokens": 24},  # per-token quantized under a global budget
    "svd": {"ratio": 2},  # rank D / 2 codes, decoded keys rotated at their global positions
    "streaming": {"tokens": 24, "options": KVOptions(sinks=4)},
    # SnapKV / PyramidKV: an observation window of 8 prompt queries (each rank scores it over every key)
    "snapkv": {"tokens": 24, "options": KVOptions(snap_window=8)},
    "pyramid": {"tokens": 24, "options": KVOptions(snap_window=8)},
    "lru": {"tokens": 24},  # hit set: a global top-3 of each step's attention mass
}
EVICTING = ("window", "h2o", "quant+h2o", "streaming", "snapkv", "pyramid", "lru")


def tiny_model(max_seq_len=TOTAL + NEW_TOKENS):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=N_HEADS * D, num_layers=L, num_heads=N_HEADS, num_kv_heads=G,
                      ffn_hidden_size=64, max_seq_len=max_seq_len)
    return Transformer(cfg, MoEConfig(every_n_layers=0)).eval()


def budget(model, policy):
    """make_cache's budget arguments of a case (SVD: bases calibrated on fixed random tokens)."""
    if policy != "svd":
        return CASES[policy]
    return {**CASES[policy], "svd_bases": calibrate_svd(model, torch.randint(0, V, (2, 64), generator=seeded(5)))}


@torch.no_grad()
def decode_logits(model, x, policy, group):
    """Prefill PREFILL tokens, then one token per step: the last logits of each call [B, steps, V]
    and the cache."""
    cache = make_cache(policy, model, total_tokens=x.shape[1], store_dtype=torch.float32, shard_group=group,
                       **budget(model, policy))
    out = [model(x[:, :PREFILL], cache)[:, -1]]
    for t in range(PREFILL, x.shape[1]):
        out.append(model(x[:, t:t + 1], cache)[:, -1])
    return torch.stack(out, 1), cache


@torch.no_grad()
def greedy(model, x, policy, group):
    cache = make_cache(policy, model, total_tokens=PREFILL + NEW_TOKENS, store_dtype=torch.float32,
                       shard_group=group, **budget(model, policy))
    return generate(model, x[:, :PREFILL], NEW_TOKENS, cache=cache)


def _parity_child(rank, world, model, x, policy):
    logits, cache = decode_logits(model, x, policy, dist.group.WORLD)
    return {"logits": logits, "tokens": greedy(model, x, policy, dist.group.WORLD), "nbytes": cache.nbytes(),
            "bytes_read": cache.bytes_read, "bounds_read": getattr(cache, "bounds_bytes_read", 0),
            "skipped": getattr(cache, "skipped_reads", 0), "seq_len": cache.seq_len,
            "decode_steps": cache.decode_steps, "layer_lengths": [cache.length(li) for li in range(L)]}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (2, TOTAL), generator=seeded(1))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("policy", list(CASES))
def test_sharded_logits_and_greedy_tokens_equal_one_process(model, tokens, policy, world):
    ref_logits, ref_cache = decode_logits(model, tokens, policy, None)
    ref_tokens = greedy(model, tokens, policy, None)
    for r, res in enumerate(run_distributed(_parity_child, world, model, tokens, policy)):
        # the same attention with its softmax split into `world` partial sums: fp32 reordering only
        torch.testing.assert_close(res["logits"], ref_logits, **REORDERED_FP32, msg=f"rank {r}")
        assert torch.equal(res["tokens"], ref_tokens), f"rank {r}"
        assert (res["seq_len"], res["decode_steps"]) == (ref_cache.seq_len, ref_cache.decode_steps)
        if policy in EVICTING:  # the global budget, split evenly: M kept + the next victim
            M = [ref_cache.length(li) for li in range(L)]  # pyramid: per layer
            assert res["layer_lengths"] == [len(range(r, m + 1, world)) for m in M]


def latent_model(window: int, rotary_fraction: float = 1.0, bits: int = 16, max_seq_len: int = TOTAL + NEW_TOKENS):
    """The tiny model with a learned KV latent, weights seeded; rotary_fraction < 1: the decoupled
    latent (MLA)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=N_HEADS * D, num_layers=L, num_heads=N_HEADS, num_kv_heads=G,
                      ffn_hidden_size=64, max_seq_len=max_seq_len, rotary_fraction=rotary_fraction)
    return Transformer(cfg, MoEConfig(every_n_layers=0),
                       kv_cfg=KVConfig(compressor="learned", latent_window=window, latent_bits=bits)).eval()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("window,rotary_fraction", [(0, 1.0), (6, 1.0), (6, 0.5)])
def test_sharded_learned_latent_equals_one_process(tokens, window, rotary_fraction, world):
    """The learned latent, joint (rotary_fraction 1) and decoupled (MLA: 0.5): codes striped over
    ranks, the exact window replicated; logits and greedy tokens as one process's (window 6: not a
    multiple of the ranks, so tokens leave it onto every rank). fp32 codes: int8 codes can round the
    other way when a layer's input differs in the last bit (the merge's reordered sums), seen as one
    code step = 2e-5 in the logits (MLA, 4 ranks); the int8 path is tested per layer below."""
    model = latent_model(window, rotary_fraction)
    CASES["learned"] = {"ratio": 2}
    try:
        ref_logits, _ = decode_logits(model, tokens, "learned", None)
        ref_tokens = greedy(model, tokens, "learned", None)
        for r, res in enumerate(run_distributed(_parity_child, world, model, tokens, "learned")):
            torch.testing.assert_close(res["logits"], ref_logits, **REORDERED_FP32, msg=f"rank {r}")
            assert torch.equal(res["tokens"], ref_tokens), f"rank {r}"
    finally:
        del CASES["learned"]


@torch.no_grad()
def latent_attend(model, q, k, v, group, policy="learned"):
    """One layer's outputs through a learned cache: a prefill of PREFILL tokens, then one per step."""
    cache = make_cache(policy, model, ratio=2, total_tokens=q.shape[2], store_dtype=torch.float32, shard_group=group)
    att = lambda a, b: cache.attend(0, q[:, :, a:b], model.rope(k[:, :, a:b], a), v[:, :, a:b], k_pre_BGTD=k[:, :, a:b],
                                    rope=model.rope, start=a)
    return torch.cat([att(0, PREFILL)] + [att(t, t + 1) for t in range(PREFILL, q.shape[2])], 2), cache.nbytes()


def _latent_layer_child(rank, world, model, q, k, v, policy):
    return latent_attend(model, q, k, v, dist.group.WORLD, policy)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
@pytest.mark.parametrize("bits,policy", [(8, "learned"), (4, "learned"), (8, "learned:b4")])
def test_sharded_quantized_latent_layer_equals_one_process(world, rotary_fraction, bits, policy):
    """int8 / int4 codes (kv.latent_bits; learned:b4 stores an int8-trained latent at 4 bits), the
    same keys/values given to one layer's cache: the sharded attention (the single process's
    absorbed path for MLA decode steps) within fp32 reordering."""
    model = latent_model(6, rotary_fraction, bits=bits)
    g = seeded(6)
    q = torch.randn(2, N_HEADS, TOTAL, D, generator=g)
    k, v = (torch.randn(2, G, TOTAL, D, generator=g) for _ in range(2))
    ref, ref_bytes = latent_attend(model, q, k, v, None, policy)
    for r, (out, nbytes) in enumerate(run_distributed(_latent_layer_child, world, model, q, k, v, policy)):
        torch.testing.assert_close(out, ref, **REORDERED_FP32, msg=f"rank {r}")
        assert nbytes < ref_bytes


@pytest.mark.parametrize("world", [2, 4])
def test_quest_shards_read_the_single_process_pages_and_skip(model, tokens, world):
    """Sharded Quest reads exactly the single process's tokens (split over ranks; every rank reads
    all page bounds); at 4 ranks with one batch row, 2 kv heads and a budget of 2 pages (one chosen
    + the current), at most 3 pages are read per layer and step, so some rank skips every time."""
    x = tokens[:1]
    _, ref = decode_logits(model, x, "quest", None)
    res = run_distributed(_parity_child, world, model, x, "quest")
    bounds = res[0]["bounds_read"]
    assert all(r["bounds_read"] == bounds for r in res)
    assert sum(r["bytes_read"] - bounds for r in res) == ref.bytes_read - bounds
    if world == 4:
        assert sum(r["skipped"] for r in res) >= ref.decode_steps * L


def fill_and_decode(model, x, cache, chunk):
    """The first tokens in prompt chunks of `chunk`, the last 4 one per step."""
    with torch.no_grad():
        for start in range(0, x.shape[1] - 4, chunk):
            model(x[:, start:min(start + chunk, x.shape[1] - 4)], cache)
        for t in range(x.shape[1] - 4, x.shape[1]):
            model(x[:, t:t + 1], cache)


def _bytes_child(rank, world, model, x, policy, kwargs, chunk):
    cache = make_cache(policy, model, total_tokens=x.shape[1], shard_group=dist.group.WORLD, **kwargs)
    fill_and_decode(model, x, cache, chunk)
    return cache.nbytes(), cache.peak_nbytes


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("policy,kwargs,length,chunk", [
    ("full", {}, 2048, 512), ("h2o", {"tokens": 256}, 1024, 1024),
    ("quant", {"ratio": 3, "options": KVOptions(quant_residual=0)}, 4096, 512), ("learned", {"ratio": 4}, 2048, 512)])
def test_kv_bytes_per_rank_within_share(policy, kwargs, length, chunk, world):
    """nbytes() per rank <= single-process nbytes / world + 5% (fp16 storage, capacity included;
    the learned latent: int8 codes).
    KIVI's fp16 buffer of the group being filled (32 tokens per layer and kv head, allocated once)
    exists on every shard: a constant the bound adds (world - 1) / world of; at 4096 tokens, 2 bits
    and 2 ranks a rank holds total / 2 + 3.4%, at 4 ranks + 10%. Likewise the learned latent's
    exact window (8 tokens), replicated."""
    # the learned latent: int8 codes, its exact window of 8 tokens replicated on every rank
    model = latent_model(8, bits=8, max_seq_len=length) if policy == "learned" else tiny_model(max_seq_len=length)
    x = torch.randint(0, V, (1, length), generator=seeded(2))
    ref = make_cache(policy, model, total_tokens=x.shape[1], **kwargs)
    fill_and_decode(model, x, ref, chunk)
    # per rank constants, fp16 keys + values: KIVI's group being filled, the latent's exact window
    group_buffer = L * G * {"quant": 32, "learned": 8}.get(policy, 0) * D * 2 * 2
    for nbytes, peak in run_distributed(_bytes_child, world, model, x, policy, kwargs, chunk):
        assert nbytes <= ref.nbytes() / world * 1.05 + group_buffer * (world - 1) / world
        assert peak <= ref.peak_nbytes / world * 1.05 + group_buffer * (world - 1) / world


def test_merge_equals_softmax_over_the_concatenation():
    """Partial attentions over disjoint key sets (one empty, rows that read nothing in one part)
    merge into plain softmax attention over all keys."""
    g = seeded(3)
    B, T, S = 2, 5, 29
    q = torch.randn(B, N_HEADS, T, D, generator=g)
    k, v = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
    keep = torch.rand(B, G, T, S, generator=g) > 0.3
    keep[..., 0] = True  # every query reads something overall
    part = torch.randint(0, 4, (S,), generator=g)
    part[part == 3] = 2  # part 3 holds nothing
    partials = [attention_lse(q, k[:, :, part == r], v[:, :, part == r], keep[..., part == r]) for r in range(4)]
    assert torch.isinf(partials[3][1]).all() and (partials[3][0] == 0).all()
    o, lse = merge_partials(torch.stack([p[0] for p in partials]), torch.stack([p[1] for p in partials]))
    ref, _ = attention(q, k, v, keep, need_probs=False)
    torch.testing.assert_close(o, ref, **REORDERED_FP32)  # the same sums in another order
    s = (q.view(B, G, N_HEADS // G, T, D) @ k[:, :, None].transpose(-1, -2)) / D ** 0.5
    ref_lse = torch.logsumexp(s.masked_fill(~keep[:, :, None], float("-inf")), -1).view(B, N_HEADS, T)
    torch.testing.assert_close(lse, ref_lse, **REORDERED_FP32)


def _count_child(rank, world, model, x, policy):
    calls = []
    group = dist.group.WORLD

    def counting(fn, name):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped
    sharded._all_gather = counting(sharded._all_gather, "all_gather")
    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor", "all_to_all_single"):
        setattr(dist, name, counting(getattr(dist, name), name))
    cache = make_cache(policy, model, total_tokens=x.shape[1], store_dtype=torch.float32, shard_group=group,
                       **budget(model, policy))
    per_step = []
    with torch.no_grad():
        model(x[:, :PREFILL], cache)
        for t in range(PREFILL, PREFILL + 4):
            calls.clear()
            model(x[:, t:t + 1], cache)
            per_step.append(list(calls))
    return per_step


@pytest.mark.parametrize("policy,per_layer", [("full", 1), ("quant", 1), ("quest", 1), ("window", 1), ("h2o", 1),
                                              ("snapkv", 1), ("lru", 2)])
def test_collectives_per_layer_and_decode_step(model, tokens, policy, per_layer):
    """The merge is one all_gather per layer, an evicting selection's eviction candidates included
    (deferred by a step: sharded_budget.py); LRU's hit set (a global top-k of this step's attention
    mass) adds one all_gather."""
    for steps in run_distributed(_count_child, 2, model, tokens, policy):
        assert steps == [["all_gather"] * (per_layer * L)] * 4


def _errors_child(rank, world, model, with_latent):
    group, out = dist.group.WORLD, []
    for m, policy, kwargs in [(with_latent, "learned@2+h2o", {"tokens": 24}), (model, "quant+quest", {"tokens": 32}),
                              (model, "h2o", {"tokens": 24, "options": KVOptions(prefill_only=True)})]:
        try:
            make_cache(policy, m, ratio=kwargs.pop("ratio", None), total_tokens=64, shard_group=group, **kwargs)
        except ValueError as err:
            out.append(str(err))
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    out.append(type(make_cache("full", model, total_tokens=64, shard_group=alone)).__name__)
    cache = make_cache("h2o", model, tokens=24, total_tokens=64, shard_group=group)
    x = torch.randint(0, V, (1, 64), generator=seeded(4))
    with torch.no_grad():
        model(x[:, :8], cache)
        try:
            model(x[:, 8:16], cache)
        except ValueError as err:
            out.append(str(err))
    return out


def test_unsupported_methods_are_named_and_a_group_of_one_is_the_plain_cache(model):
    errors = run_distributed(_errors_child, 2, model, latent_model(2))[0]
    assert len(errors) == 5
    assert errors.pop(3) == "KVCache"  # a group of one rank: today's cache
    assert ("'learned@2+h2o': the sharded learned latent keeps every token (selection 'all')" in errors[0]
            and "selections with learned storage across ranks: all (else: window, streaming, h2o, snapkv, pyramid, "
                "lru with exact, quant or svd storage)" in errors[0])
    assert "sharded quest (shard-skipping) needs exact storage" in errors[1]
    assert "KVOptions.prefill_only is not supported across ranks" in errors[2]
    assert "takes a prefill at position 0 and then one token per step; got 8 tokens at position 8" in errors[3]
