"""The fused C++ decode attention over the quantized stores (pikv/kv/kernels), both builds: the
AVX-512 one ("simd", quant_decode_avx512.h) and the portable one (-DPIKV_NO_SIMD), against each
other and two independent references on the same stored codes: the torch compressed-domain path
(the store's blockwise `_blocks`, fused_kernel = False) and dequantize-then-attend
(`pikv.kv.attention.attention` over the keys/values the store's `read` dequantizes). The kernels
are built once per machine (cached in $PIKV_CACHE/torch_extensions), so a test session pays at most
two builds (~10-30 s each) and then loads them; `kernels.calls` proves which path really ran, and
`kernels.simd_tiles()` that the AVX-512 loops did on a CPU that has them.

Tolerance: REORDERED_FP32 throughout. All compute in fp32 from the same codes; they differ only in
the order of the sums (scales folded into the query / weights, per-tile online-softmax rescaling vs
one softmax, 16-lane partial sums) and in the kernels' polynomial exp (relative error ~2e-7). Bit
slices (widths 3, 5, 6, 7) change nothing there: the kernels recombine them into whole codes (integers
below 256, exact in fp32), the torch blocks sum one fold per slice with the scale times 2^shift (exact
powers of two), so again only the order of the sums differs."""

from pathlib import Path

import pytest
import torch

from pikv.kv import KVCache, KVOptions, kernels
from pikv.kv.attention import attention
from pikv.kv.quant import KiviStore, TokenQuantStore
from pikv.kv.selection import SELECTIONS
from tests.helpers import REORDERED_FP32, seeded

B, N, G, D, GROUP = 3, 6, 2, 32, 32  # GQA: 3 query heads per kv head
VARIANTS = ["simd", "portable", "torch"]  # the fused kernel's two builds, then the torch blocks


def _cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512f" in flags and "avx512bw" in flags


AVX512 = _cpu_has_avx512()  # -march=native then compiles the AVX-512 loops into the "simd" build


@pytest.fixture(scope="session", autouse=True)
def built_kernel():
    for variant in ("simd", "portable"):
        if kernels.quant_decode(variant) is None:
            pytest.skip(f"the fused kernel ({variant}) cannot be built here: {kernels.reason(variant)}")


def make_store(layout, bits, residual, group=GROUP):
    return KiviStore(bits, group, residual) if layout == "kivi" else TokenQuantStore(bits, group)


def mixed_store(layout, kbits, vbits, residual, k, v, group=GROUP):
    """A store holding keys at kbits and values at vbits (the values' buffers of a vbits store fed
    the same tokens spliced in: the kernel reads each width off its buffer's shape), and the
    dequantized keys/values the reference attends over."""
    stores = [make_store(layout, bits, residual, group) for bits in (kbits, vbits)]
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


def decode(store, q, extra, need_probs, variant):
    """One decode step through `variant` ("simd", "portable" or "torch"), asserting it ran."""
    store.fused_kernel, store.fused_simd = variant != "torch", variant == "simd"
    S = store.length()
    counter = {"simd": "fused", "portable": "portable", "torch": "torch"}[variant]
    before = kernels.calls[counter]
    out = store.attend(q, lambda: store.read(torch.float32, None, 0, S - 1, 1), 0, S - 1, 1, extra, need_probs)
    assert kernels.calls[counter] == before + 1  # the path asked for ran
    return out


def simd_tiles_taken(before, layout, quantized):
    """The AVX-512 loops ran for every quantized part (on a CPU with AVX-512; else none did)."""
    grown = [a - b for a, b in zip(kernels.simd_tiles(), before)]
    if not AVX512:
        return grown == [0, 0, 0]
    if not quantized:
        return grown == [0, 0, 0]
    keys = grown[1] if layout == "kivi" else grown[0]
    return keys > 0 and grown[2] > 0


CASES = [("kivi", 2, 2, 0), ("kivi", 4, 4, 32), ("kivi", 4, 2, 32), ("kivi", 2, 4, 0),
         ("token", 2, 2, 0), ("token", 4, 4, 0), ("token", 4, 2, 0), ("token", 2, 4, 0)]


@pytest.mark.parametrize("layout,kbits,vbits,residual", CASES)
@pytest.mark.parametrize("S", [229, 77, 13])  # not multiples of 16 / the 64-token tile; fewer than 16
@pytest.mark.parametrize("need_probs", [False, True])
def test_fused_decode_equals_torch_path_and_dequantize_then_attend(layout, kbits, vbits, residual, S, need_probs):
    """Both builds against dequantize-then-attend, each other and (one width) the torch blocks; a
    different read mask with holes per batch row and kv head."""
    q = torch.randn(B, N, 1, D, generator=seeded(1)) * 2
    k, v = torch.randn(B, G, S, D, generator=seeded(2)), torch.randn(B, G, S, D, generator=seeded(3))
    store, k_ref, v_ref = mixed_store(layout, kbits, vbits, residual, k, v)
    extra = torch.rand(B, G, 1, S, generator=seeded(4)) < 0.7  # a different read mask per row and kv head
    extra[..., -1] = True
    o_ref, p_ref = attention(q, k_ref, v_ref, extra, need_probs)
    quantized = store.length() > (store.buf.n if layout == "kivi" else 0)
    before = kernels.simd_tiles()
    o, p = decode(store, q, extra, need_probs, "simd")
    assert simd_tiles_taken(before, layout, quantized)
    o_portable, p_portable = decode(store, q, extra, need_probs, "portable")
    torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
    torch.testing.assert_close(o, o_portable, **REORDERED_FP32)
    if quantized:
        assert (o - attention(q, k, v, extra, False)[0]).abs().max() > 1e-3  # the codes are read, not exact keys
    if need_probs:
        torch.testing.assert_close(p, p_ref, **REORDERED_FP32)
        torch.testing.assert_close(p, p_portable, **REORDERED_FP32)
        assert p.shape == (B, N, 1, S) and (p.view(B, G, 3, S) * ~extra).sum() == 0  # masked: exactly 0
    else:
        assert p is None and p_portable is None
    if kbits == vbits:  # the torch blockwise path reads one width for both
        o_torch, p_torch = decode(store, q, extra, need_probs, "torch")
        torch.testing.assert_close(o, o_torch, **REORDERED_FP32)
        if need_probs:
            torch.testing.assert_close(p, p_torch, **REORDERED_FP32)


@pytest.mark.parametrize("layout", ["kivi", "token"])
@pytest.mark.parametrize("bits", [2, 4])
def test_shapes_outside_the_simd_loops_fall_back_to_the_portable_ones(layout, bits):
    """Head dim 64 with groups of 32 channels: two value scales per token (and per-token keys),
    which the AVX-512 loops do not cover (KIVI's per-channel keys they do): the same numbers."""
    D64, S = 64, 150
    q = torch.randn(B, N, 1, D64, generator=seeded(20))
    k, v = torch.randn(B, G, S, D64, generator=seeded(21)), torch.randn(B, G, S, D64, generator=seeded(22))
    store, k_ref, v_ref = mixed_store(layout, bits, bits, 16, k, v)
    extra = torch.rand(B, G, 1, S, generator=seeded(23)) < 0.8
    before = kernels.simd_tiles()
    o, p = decode(store, q, extra, True, "simd")
    grown = [a - b for a, b in zip(kernels.simd_tiles(), before)]
    assert grown[0] == grown[2] == 0 and (grown[1] > 0) == (AVX512 and layout == "kivi")
    o_ref, p_ref = attention(q, k_ref, v_ref, extra, True)
    torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
    torch.testing.assert_close(p, p_ref, **REORDERED_FP32)
    torch.testing.assert_close(o, decode(store, q, extra, False, "portable")[0], **REORDERED_FP32)


@pytest.mark.parametrize("bits,group", [(1, 32), (2, 16)])
def test_kivi_channel_rows_of_four_bytes(bits, group):
    """KIVI keys whose channel rows hold 4 bytes (1-bit codes of 32 tokens, 2-bit of 16) take the
    AVX-512 loops too (so do 1-bit values at head dim 32): the same numbers as the portable build."""
    S = 150
    q = torch.randn(B, N, 1, D, generator=seeded(40))
    k, v = torch.randn(B, G, S, D, generator=seeded(41)), torch.randn(B, G, S, D, generator=seeded(42))
    store, k_ref, v_ref = mixed_store("kivi", bits, bits, 0, k, v, group)
    extra = torch.rand(B, G, 1, S, generator=seeded(43)) < 0.8
    before = kernels.simd_tiles()
    o, p = decode(store, q, extra, True, "simd")
    grown = [a - b for a, b in zip(kernels.simd_tiles(), before)]
    assert grown[0] == 0 and (grown[1] > 0) == AVX512 and (grown[2] > 0) == (AVX512 and group == D)
    o_ref, p_ref = attention(q, k_ref, v_ref, extra, True)
    torch.testing.assert_close(o, o_ref, **REORDERED_FP32)
    torch.testing.assert_close(p, p_ref, **REORDERED_FP32)
    torch.testing.assert_close(o, decode(store, q, extra, False, "portable")[0], **REORDERED_FP32)


@pytest.mark.parametrize("layout", ["kivi", "token"])
def test_no_mask_and_a_mask_shared_by_the_heads(layout):
    S = 100
    q = torch.randn(B, N, 1, D, generator=seeded(5))
    k, v = torch.randn(B, G, S, D, generator=seeded(6)), torch.randn(B, G, S, D, generator=seeded(7))
    store, k_ref, v_ref = mixed_store(layout, 2, 2, 0, k, v)
    shared = torch.rand(B, 1, 1, S, generator=seeded(8)) < 0.5  # one keep set per batch row (H = 1)
    for extra in (None, shared):
        for variant in ("simd", "portable"):
            o, _ = decode(store, q, extra, False, variant)
            torch.testing.assert_close(o, attention(q, k_ref, v_ref, extra, False)[0], **REORDERED_FP32)


def cache(store, selection, variant):
    store.fused_kernel, store.fused_simd = variant != "torch", variant == "simd"
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
    for variant, compressed in (("simd", True), ("portable", True), ("torch", True), ("torch", False)):
        store = TokenQuantStore(bits, GROUP, None, 256, 65)
        store.compressed_attention = compressed
        caches.append(cache(store, "h2o", variant))
    before = dict(kernels.calls)
    outs = [[c.attend(0, q[:, :, s:s + T], k[:, :, s:s + T], v[:, :, s:s + T], start=s)
             for s, T in [(0, 100)] + [(t, 1) for t in range(100, total)]] for c in caches]
    for counter in ("fused", "portable"):  # every decode step of the first two caches
        assert kernels.calls[counter] - before[counter] == total - 100
    for c, out in zip(caches[1:], outs[1:]):
        assert torch.equal(caches[0].positions(0), c.positions(0))  # the same tokens kept
        for o, r in zip(outs[0], out):
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
    o_fused, _ = decode(store, q, None, False, "simd")
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("PIKV_KV_KERNEL", "0")
    before = kernels.calls["torch"]
    o, _ = store.attend(q, lambda: None, 0, S - 1, 1, None, False)
    assert kernels.calls["torch"] == before + 1 and "PIKV_KV_KERNEL=0" in kernels.reason()
    assert not (tmp_path / "torch_extensions").exists()  # nothing was built
    torch.testing.assert_close(o, o_fused, **REORDERED_FP32)


@pytest.mark.parametrize("kbits,vbits", [(5, 4), (6, 4), (7, 3), (3, 5)])
@pytest.mark.parametrize("D,group", [(32, 32), (64, 64), (64, 32)])
@pytest.mark.parametrize("need_probs", [False, True])
def test_bit_slices_equal_torch_path_and_dequantize_then_attend(kbits, vbits, D, group, need_probs):
    """Widths stored as bit slices (pikv/kv/bitslice.py) through both builds, with a read mask: one
    group per row takes the AVX-512 loops (head dim 32: the 1-bit slices have rows of 4 bytes), two
    groups per row the portable ones, whose slices' planar orders differ from the top slice's."""
    S = 150
    q = torch.randn(B, N, 1, D, generator=seeded(30)) * 2
    k, v = torch.randn(B, G, S, D, generator=seeded(31)), torch.randn(B, G, S, D, generator=seeded(32))
    store = TokenQuantStore(kbits, group, value_bits=vbits)
    store.append(k[:, :, :-1], k[:, :, :-1], v[:, :, :-1])
    store.settle()
    store.append(k[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    assert len(store.parts["k"]) > 1 and (len(store.parts["v"]) > 1) == (vbits in (3, 5))  # sliced tensors
    k_ref, v_ref, _ = store.read(torch.float32, None, 0, S - 1, 1)
    extra = torch.rand(B, G, 1, S, generator=seeded(33)) < 0.7
    extra[..., -1] = True
    o_ref, p_ref = attention(q, k_ref, v_ref, extra, need_probs)
    before = kernels.simd_tiles()
    o, p = decode(store, q, extra, need_probs, "simd")
    grown = [a - b for a, b in zip(kernels.simd_tiles(), before)]
    tiles = B * G * -(-(S - 1) // 64) if AVX512 and group == D else 0  # per row and kv head, 64 coded tokens each
    assert grown == [tiles, 0, tiles]  # every tile's keys and values
    for other in (decode(store, q, extra, need_probs, "portable"), decode(store, q, extra, need_probs, "torch"),
                  (o_ref, p_ref)):
        torch.testing.assert_close(o, other[0], **REORDERED_FP32)
        if need_probs:
            torch.testing.assert_close(p, other[1], **REORDERED_FP32)
    assert (o - attention(q, k, v, extra, False)[0]).abs().max() > 1e-3  # the codes are read, not exact keys
    if need_probs:
        assert (p.view(B, G, 3, S) * ~extra).sum() == 0  # masked: exactly 0
    else:
        assert p is None


@pytest.mark.parametrize("kbits,vbits", [(4, 2), (8, 4), (5, 4), (3, 5)])
def test_rotated_mixed_widths_under_h2o(kbits, vbits):
    """rquant (the rotation outside the codes, keys and values at their own widths, one group per
    head) through the kernel: the same kept tokens and outputs as its torch blockwise path."""
    from pikv.kv.rotated import RotatedQuantStore, rotation_matrix
    total, D64 = 120, 64
    q = torch.randn(B, N, total, D64, generator=seeded(12)) * 2
    k, v = torch.randn(B, G, total, D64, generator=seeded(13)), torch.randn(B, G, total, D64, generator=seeded(14))
    caches = [cache(RotatedQuantStore(rotation_matrix(D64, 0), kbits, D64, None, 256, 65, vbits), "h2o", variant)
              for variant in VARIANTS]
    before, tiles = dict(kernels.calls), kernels.simd_tiles()
    outs = [[c.attend(0, q[:, :, s:s + T], k[:, :, s:s + T], v[:, :, s:s + T], start=s)
             for s, T in [(0, 90)] + [(t, 1) for t in range(90, total)]] for c in caches]
    for counter in ("fused", "portable"):
        assert kernels.calls[counter] - before[counter] == total - 90
    assert simd_tiles_taken(tiles, "token", True)  # head dim 64, one group per head: the AVX-512 loops
    for c, out in zip(caches[1:], outs[1:]):
        assert torch.equal(caches[0].positions(0), c.positions(0))
        for o, r in zip(outs[0], out):
            torch.testing.assert_close(o, r, **REORDERED_FP32)
