"""The fused C++ decode op of the decoupled latent (pikv/kv/kernels/mla_decode.cpp), both builds:
the AVX-512 one ("simd") and the portable one (-DPIKV_NO_SIMD).
- The op alone against reconstruct-then-attend written here (dequantize the int8 codes, rebuild
  every key and value through the up-projection, one softmax): latent token counts around the
  64-token tile and 16-token vector (0, 1, 15, 16, 17, 64, 65, 200), both latent segments, strided
  views of larger capacity buffers, GQA, rank below the trained maximum, a rank under 4 (the
  portable unpack inside the SIMD build), with and without the probabilities.
- MLAStore's decode steps: fused == the torch absorbed path (fused_kernel = False) == the explicit
  path (Store.attend over reconstructed keys) on the same cache states, H2O's probabilities and its
  in-place evictions (the newest code takes the victim's slot: slots out of position order)
  included; `kernels.calls` proves which path ran.

Tolerance: REORDERED_FP32 throughout. Everything is fp32 from the same int8 codes; the paths differ
in the order of the sums (scales folded into the scores / weights, the up-projection absorbed vs
applied to every token, per-tile online-softmax rescaling, 16-lane partial sums) and in the
kernel's polynomial exp (relative error ~2e-7)."""

import math

import pytest
import torch

from pikv.kv import kernels, make_cache
from pikv.kv.mla import MLAStore
from pikv.kv.storage import Store
from tests.helpers import REORDERED_FP32, seeded
from tests.unit.test_kv_mla import N_TOK, PREFILL, decode, tiny_model

BUILDS = ["simd", "portable"]


@pytest.fixture(scope="session", autouse=True)
def built_kernel():
    for variant in BUILDS:
        if kernels.mla_decode(variant) is None:
            pytest.skip(f"the fused kernel ({variant}) cannot be built here: {kernels.reason(variant)}")


def latent_segment(gen, B, G, S, r, P, capacity):
    """int8 codes / rotated dims with fp16 per-token scales, as views of [B, H, capacity, .] buffers."""
    c = torch.randint(-127, 128, (B, 1, capacity, r), dtype=torch.int8, generator=gen)
    kr = torch.randint(-127, 128, (B, G, capacity, P), dtype=torch.int8, generator=gen)
    c_scale = (torch.rand(B, 1, capacity, 1, generator=gen) * 0.02 + 1e-3).half()
    kr_scale = (torch.rand(B, 1, capacity, 1, generator=gen) * 0.02 + 1e-3).half()
    return c[:, 0, :S], c_scale[:, 0, :S, 0], kr[:, :, :S], kr_scale[:, 0, :S, 0]


def reconstruct_then_attend(q, up, r, segments, k_x, v_x):
    """The reference: every latent token's key (rotated dims, then Uk_g c) and value (Uv_g c)
    rebuilt from its dequantized codes, then one softmax over latent + exact tokens."""
    B, G, M, D = q.shape
    P = segments[0][2].shape[-1]
    Ck = G * (D - P)
    keys, values = [], []
    for c, c_scale, kr, kr_scale in segments:
        lat_BSR = c.float() * c_scale.float()[..., None]
        k_rot = kr.float() * kr_scale.float()[:, None, :, None]
        k_lat = (lat_BSR @ up[:Ck, :r].T).view(B, -1, G, D - P).transpose(1, 2)
        keys.append(torch.cat([k_rot, k_lat], -1))
        values.append((lat_BSR @ up[Ck:, :r].T).view(B, -1, G, D).transpose(1, 2))
    k = torch.cat(keys + [k_x], 2)
    v = torch.cat(values + [v_x], 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
    return p @ v, p


CASES = [  # (latent tokens in the buffers, this step's leaving tokens, exact tokens)
    (0, 0, 3), (0, 1, 0), (1, 0, 2), (15, 1, 8), (16, 0, 1), (17, 2, 5), (64, 1, 8), (65, 0, 8), (200, 1, 8)]


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("S,L,X", CASES)
@pytest.mark.parametrize("need_probs", [False, True])
def test_the_op_equals_reconstruct_then_attend(variant, S, L, X, need_probs):
    B, G, M, D, P, r, R = 2, 2, 3, 32, 16, 27, 40  # GQA; rank 27 of a compressor trained to 40
    gen = seeded(S * 100 + L * 10 + X)
    q = torch.randn(B, G, M, D, generator=gen) * 2
    up = torch.randn(G * (2 * D - P), R, generator=gen) * 0.3
    segments = [latent_segment(gen, B, G, S, r, P, S + 7), latent_segment(gen, B, G, L, r, P, L + 3)]
    k_x, v_x = torch.randn(B, G, X, D, generator=gen), torch.randn(B, G, X, D, generator=gen)
    o, p = kernels.mla_decode(variant)(q, up, r, *segments[0], *segments[1], k_x, v_x, need_probs)
    o_ref, p_ref = reconstruct_then_attend(q, up, r, segments, k_x, v_x)
    torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
    torch.testing.assert_close(p, p_ref if need_probs else p_ref[..., S + L:], **REORDERED_FP32)


@pytest.mark.parametrize("variant", BUILDS)
def test_small_shapes_one_query_row_a_rank_under_4_and_8_rotated_dims(variant):
    B, G, M, D, P, r, S = 2, 1, 1, 16, 8, 3, 70
    gen = seeded(3)
    q, up = torch.randn(B, G, M, D, generator=gen), torch.randn(G * (2 * D - P), r, generator=gen)
    segments = [latent_segment(gen, B, G, S, r, P, 80), latent_segment(gen, B, G, 1, r, P, 1)]
    k_x, v_x = torch.randn(B, G, 2, D, generator=gen), torch.randn(B, G, 2, D, generator=gen)
    o, p = kernels.mla_decode(variant)(q, up, r, *segments[0], *segments[1], k_x, v_x, True)
    o_ref, p_ref = reconstruct_then_attend(q, up, r, segments, k_x, v_x)
    torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
    torch.testing.assert_close(p, p_ref, **REORDERED_FP32)


def test_the_simd_build_runs_its_avx512_loops_where_the_cpu_has_them():
    from tests.unit.test_kv_kernel import AVX512
    gen = seeded(4)
    segments = [latent_segment(gen, 1, 2, 130, 27, 16, 130), latent_segment(gen, 1, 2, 0, 27, 16, 0)]
    args = (torch.randn(1, 2, 3, 32, generator=gen), torch.randn(2 * 48, 27, generator=gen), 27, *segments[0],
            *segments[1], torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32), False)
    before = kernels.mla_simd_tiles()
    kernels.mla_decode("portable")(*args)
    assert kernels.mla_simd_tiles() == before  # the portable build has no AVX-512 loops
    kernels.mla_decode("simd")(*args)
    assert kernels.mla_simd_tiles() - before == (3 if AVX512 else 0)  # 130 tokens: 3 tiles


def test_bad_inputs_name_what_is_expected():
    gen = seeded(5)
    segments = latent_segment(gen, 1, 2, 4, 27, 16, 4)
    q, up = torch.randn(1, 2, 3, 32), torch.randn(96, 27)
    k_x = torch.randn(1, 2, 1, 32)
    with pytest.raises(RuntimeError, match=r"c \[B, S, r\]: Char"):
        kernels.mla_decode()(q, up, 27, segments[0].float(), *segments[1:], *segments, k_x, k_x, False)
    with pytest.raises(RuntimeError, match="0 < rank <= R"):
        kernels.mla_decode()(q, up, 28, *segments, *segments, k_x, k_x, False)
    with pytest.raises(ValueError, match="unknown kernel 'nope'; allowed"):
        kernels.kernel_op("nope")


def checked_against_torch_and_explicit(store, log):
    """Wrap `store.attend`: each decode step also runs the torch absorbed path and the explicit
    path (Store.attend over reconstructed keys/values) on the same state."""
    fused = store.attend

    def attend(q, read, pos, start, T, extra, need_probs):
        got = fused(q, read, pos, start, T, extra, need_probs)
        if T == 1:
            store.fused_kernel = False
            torch_path = store.absorbed(q, True)
            store.fused_kernel = True
            log.append((got, torch_path, Store.attend(store, q, read, pos, start, T, extra, True)))
        return got
    store.attend = attend


@pytest.mark.parametrize("variant", BUILDS)
@pytest.mark.parametrize("policy,window", [("learned", 0), ("learned", 3), ("learned+h2o", 0), ("learned+h2o", 3)])
def test_decode_steps_fused_equal_the_torch_path_and_the_explicit_one(variant, policy, window):
    model = tiny_model(bits=8, window=window)
    cache = make_cache(policy, model, ratio=2 if policy == "learned" else 4, total_tokens=N_TOK,
                       store_dtype=torch.float32)
    assert all(type(s) is MLAStore for s in cache.stores)
    log = []
    for store in cache.stores:
        store.fused_simd = variant == "simd"
        checked_against_torch_and_explicit(store, log)
    counter = "mla_fused" if variant == "simd" else "mla_portable"
    before = dict(kernels.calls)
    decode(model, torch.randint(0, 96, (2, N_TOK), generator=seeded(1)), cache)
    steps = len(cache.stores) * (N_TOK - 1 - PREFILL)
    assert len(log) == steps
    assert kernels.calls[counter] - before[counter] == steps  # every decode step ran the kernel asked for
    assert kernels.calls["mla_torch"] - before["mla_torch"] == steps  # the checks' torch path
    for (o, p), (o_torch, p_torch), (o_ref, p_ref) in log:
        torch.testing.assert_close(o, o_torch, **REORDERED_FP32)
        torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
        torch.testing.assert_close(p_torch, p_ref, **REORDERED_FP32)
        if p is not None:  # h2o: per stored token (slots in the store's order), the window's once
            torch.testing.assert_close(p, p_ref, **REORDERED_FP32)
    assert (policy == "learned+h2o") == (log[0][0][1] is not None)
    if policy == "learned+h2o":  # in-place evictions happened: slots no longer in position order
        assert cache.length(0) == cache.budgets[0]
        pos = cache.positions(0)[0, 0, :cache.stores[0].buf.n]
        assert (pos[1:] < pos[:-1]).any()


def test_other_code_widths_and_the_switch_keep_the_torch_path():
    for bits, switch in ((16, True), (4, True), (8, False)):
        model = tiny_model(bits=bits)
        cache = make_cache("learned", model, ratio=2, total_tokens=N_TOK, store_dtype=torch.float32)
        for store in cache.stores:
            store.fused_kernel = switch
        before = dict(kernels.calls)
        decode(model, torch.randint(0, 96, (1, N_TOK), generator=seeded(2)), cache)
        assert kernels.calls["mla_fused"] == before["mla_fused"]
        assert kernels.calls["mla_torch"] - before["mla_torch"] == (len(cache.stores) * (N_TOK - 1 - PREFILL)
                                                                    if bits == 8 else 0)
