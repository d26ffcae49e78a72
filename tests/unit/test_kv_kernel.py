"""The fused C++ decode attention over the quantized stores (pikv/kv/kernels) against two
independent references on the same stored codes: the torch compressed-domain path (the store's
blockwise `_blocks`, fused_kernel = False) and dequantize-then-attend (`pikv.kv.attention.attention`
over the keys/values the store's `read` dequantizes). The kernel is built once per machine (cached
in $PIKV_CACHE/torch_extensions), so a test session pays at most one build (~15-40 s) and then
loads it; `kernels.calls` proves the fused path really ran.

Tolerance: REORDERED_FP32 throughout. All three compute in fp32 from the same codes; they differ
only in the order of the sums (scales folded into the query / weights, per-tile online-softmax
rescaling vs one softmax) and in the kernel's polynomial exp (relative error ~2e-7)."""

import pytest
import torch

from pikv.kv import KVCache, KVOptions, kernels
from pikv.kv.attention import attention
from pikv.kv.quant import KiviStore, TokenQuantStore
from pikv.kv.selection import SELECTIONS
from tests.helpers import REORDERED_FP32, seeded

B, N, G, D, GROUP = 3, 6, 2, 32, 32  # GQA: 3 query heads per kv head


@pytest.fixture(scope="session", autouse=True)
def built_kernel():
    if kernels.quant_decode() is None:
        pytest.skip(f"the fused kernel cannot be built here: {kernels.reason()}")


def make_store(layout, bits, residual):
    return KiviStore(bits, GROUP, residual) if layout == "kivi" else TokenQuantStore(bits, GROUP)


def mixed_store(layout, kbits, vbits, residual, k, v):
    """A store holding keys at kbits and values at vbits (the values' buffers of a vbits store fed
    the same tokens spliced in: the kernel reads each width off its buffer's shape), and the
    dequantized keys/values the reference attends over."""
    stores = [make_store(layout, bits, residual) for bits in (kbits, vbits)]
    for store in stores:
        store.block_codes = 2048  # many blocks on the torch path
        store.append(k[:, :, :-1], k[:, :, :-1], v[:, :, :-1])
        store.settle()
        store.append(k[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    keys_store, values_store = stores
    S = k.shape[2]
    k_ref = keys_store.read(torch.float32, None, 0, S - 1, 1)[0].float()
    v_ref = values_store.read(torch.float32, None, 0, S - 1, 1)[1].float()
    if layout == "kivi":
        keys_store.vtokens = values_store.vtokens
    else:
        keys_store.buf.t.update({name: values_store.buf.t[name] for name in ("vc", "vs", "vz")})
    return keys_store, k_ref, v_ref


def decode(store, q, extra, need_probs, fused):
    store.fused_kernel = fused
    S = store.length()
    before = dict(kernels.calls)
    out = store.attend(q, lambda: store.read(torch.float32, None, 0, S - 1, 1), 0, S - 1, 1, extra, need_probs)
    assert kernels.calls["fused"] - before["fused"] == int(fused)  # the fused kernel ran (or not)
    return out


CASES = [("kivi", 2, 2, 0), ("kivi", 4, 4, 32), ("kivi", 4, 2, 32), ("kivi", 2, 4, 0),
         ("token", 2, 2, 0), ("token", 4, 4, 0), ("token", 4, 2, 0)]


@pytest.mark.parametrize("layout,kbits,vbits,residual", CASES)
@pytest.mark.parametrize("need_probs", [False, True])
def test_fused_decode_equals_torch_path_and_dequantize_then_attend(layout, kbits, vbits, residual, need_probs):
    S = 229  # KIVI: 7 groups of 32 codes (6 with residual 32) + the fp16 rest
    q = torch.randn(B, N, 1, D, generator=seeded(1)) * 2
    k, v = torch.randn(B, G, S, D, generator=seeded(2)), torch.randn(B, G, S, D, generator=seeded(3))
    store, k_ref, v_ref = mixed_store(layout, kbits, vbits, residual, k, v)
    extra = torch.rand(B, G, 1, S, generator=seeded(4)) < 0.7  # a different read mask per row and kv head
    extra[..., -1] = True
    o, p = decode(store, q, extra, need_probs, fused=True)
    o_ref, p_ref = attention(q, k_ref, v_ref, extra, need_probs)
    torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
    assert (o - attention(q, k, v, extra, False)[0]).abs().max() > 1e-3  # the codes are read, not exact keys
    if need_probs:
        torch.testing.assert_close(p, p_ref, **REORDERED_FP32)
        assert p.shape == (B, N, 1, S) and (p.view(B, G, 3, S) * ~extra).sum() == 0  # masked: exactly 0
    else:
        assert p is None
    if kbits == vbits:  # the torch blockwise path reads one width for both
        o_torch, p_torch = decode(store, q, extra, need_probs, fused=False)
        torch.testing.assert_close(o, o_torch, **REORDERED_FP32)
        if need_probs:
            torch.testing.assert_close(p, p_torch, **REORDERED_FP32)


@pytest.mark.parametrize("layout", ["kivi", "token"])
def test_no_mask_and_a_mask_shared_by_the_heads(layout):
    S = 100
    q = torch.randn(B, N, 1, D, generator=seeded(5))
    k, v = torch.randn(B, G, S, D, generator=seeded(6)), torch.randn(B, G, S, D, generator=seeded(7))
    store, k_ref, v_ref = mixed_store(layout, 2, 2, 0, k, v)
    shared = torch.rand(B, 1, 1, S, generator=seeded(8)) < 0.5  # one keep set per batch row (H = 1)
    for extra in (None, shared):
        o, _ = decode(store, q, extra, False, fused=True)
        torch.testing.assert_close(o, attention(q, k_ref, v_ref, extra, False)[0], **REORDERED_FP32)


def cache(store, selection, fused):
    store.fused_kernel = fused
    opt = KVOptions(quant_group=GROUP)
    return KVCache(1, selection=SELECTIONS[selection](opt), options=opt, store=lambda li: store, budgets=[64])


@pytest.mark.parametrize("bits", [2, 4])
def test_h2o_decoding_after_evictions(bits):
    """Per-token codes under H2O: the kernel's probabilities drive the evictions, so the kept tokens
    and the outputs of every step match the torch path and dequantize-then-attend."""
    total = 140
    q = torch.randn(B, N, total, D, generator=seeded(9)) * 2
    k, v = torch.randn(B, G, total, D, generator=seeded(10)), torch.randn(B, G, total, D, generator=seeded(11))
    caches = []
    for fused, compressed in ((True, True), (False, True), (False, False)):
        store = TokenQuantStore(bits, GROUP, None, 256, 65)
        store.compressed_attention = compressed
        caches.append(cache(store, "h2o", fused))
    before = kernels.calls["fused"]
    outs = [[c.attend(0, q[:, :, s:s + T], k[:, :, s:s + T], v[:, :, s:s + T], start=s)
             for s, T in [(0, 100)] + [(t, 1) for t in range(100, total)]] for c in caches]
    assert kernels.calls["fused"] - before == total - 100  # every decode step of the first cache
    for other in caches[1:]:
        assert torch.equal(caches[0].positions(0), other.positions(0))  # the same tokens kept
        for o, r in zip(outs[0], outs[1]):
            torch.testing.assert_close(o, r, **REORDERED_FP32)
    assert not torch.equal(caches[0].positions(0), torch.arange(total - 64, total).expand(B, G, 64))  # H2O evicted


def test_autograd_through_the_cache_takes_the_torch_path():
    S = 80
    q = torch.randn(B, N, 1, D, generator=seeded(12)).requires_grad_()
    k, v = torch.randn(B, G, S, D, generator=seeded(13)), torch.randn(B, G, S, D, generator=seeded(14))
    store, k_ref, v_ref = mixed_store("kivi", 4, 4, 16, k, v)
    before = kernels.calls["torch"]
    o, _ = store.attend(q, lambda: None, 0, S - 1, 1, None, False)
    assert kernels.calls["torch"] == before + 1 and o.requires_grad
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_switched_off_by_the_environment_runs_the_torch_path(monkeypatch, tmp_path):
    """PIKV_KV_KERNEL=0 (as a machine without a compiler): no build, the torch blocks, the same
    numbers; the build folder is the project's, under $PIKV_CACHE."""
    monkeypatch.setenv("PIKV_CACHE", str(tmp_path))
    assert kernels.cache_dir() == tmp_path / "torch_extensions"
    S = 90
    q = torch.randn(B, N, 1, D, generator=seeded(15))
    k, v = torch.randn(B, G, S, D, generator=seeded(16)), torch.randn(B, G, S, D, generator=seeded(17))
    store, _, _ = mixed_store("token", 4, 4, 0, k, v)
    o_fused, _ = decode(store, q, None, False, fused=True)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("PIKV_KV_KERNEL", "0")
    before = kernels.calls["torch"]
    o, _ = store.attend(q, lambda: None, 0, S - 1, 1, None, False)
    assert kernels.calls["torch"] == before + 1 and "PIKV_KV_KERNEL=0" in kernels.reason()
    assert not (tmp_path / "torch_extensions").exists()  # nothing was built
    torch.testing.assert_close(o, o_fused, **REORDERED_FP32)


@pytest.mark.parametrize("kbits,vbits", [(4, 2), (8, 4)])
def test_rotated_mixed_widths_under_h2o(kbits, vbits):
    """rquant (the rotation outside the codes, keys and values at their own widths, one group per
    head) through the kernel: the same kept tokens and outputs as its torch blockwise path."""
    from pikv.kv.rotated import RotatedQuantStore, rotation_matrix
    total, D64 = 120, 64
    q = torch.randn(B, N, total, D64, generator=seeded(12)) * 2
    k, v = torch.randn(B, G, total, D64, generator=seeded(13)), torch.randn(B, G, total, D64, generator=seeded(14))
    caches = [cache(RotatedQuantStore(rotation_matrix(D64, 0), kbits, D64, None, 256, 65, vbits), "h2o", fused)
              for fused in (True, False)]
    before = kernels.calls["fused"]
    outs = [[c.attend(0, q[:, :, s:s + T], k[:, :, s:s + T], v[:, :, s:s + T], start=s)
             for s, T in [(0, 90)] + [(t, 1) for t in range(90, total)]] for c in caches]
    assert kernels.calls["fused"] - before == total - 90
    assert torch.equal(caches[0].positions(0), caches[1].positions(0))
    for o, r in zip(outs[0], outs[1]):
        torch.testing.assert_close(o, r, **REORDERED_FP32)
