"""Quantized stores attending in their compressed domain (pikv/kv/quant.py) against the reference
path they replace: dequantize every stored token, then attend (`Store.attend` of the base class,
selected with compressed_attention = False) on the same inputs, step by step. Plus the planar
unpacking and the memory a decode step allocates."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pikv.kv import KVCache, KVOptions
from pikv.kv.budgets import QuantFormat, quant_nbytes_per_head
from pikv.kv.quant import KiviStore, TokenQuantStore, Unpacker, pack, unpack
from pikv.kv.rotated import RotatedQuantStore, rotation_matrix
from pikv.kv.selection import SELECTIONS
from tests.helpers import REORDERED_FP32, seeded

B, N, G, D, GROUP = 2, 6, 2, 32, 32  # GQA: 3 query heads per kv head
SMALL_BLOCKS = 2048  # codes per unpacked block: one KIVI key group, 16 per-token tokens (many blocks)


def twin_caches(make_store, selection="all", budget=None, block_codes=SMALL_BLOCKS):
    """(compressed-domain cache, reference cache) with the same store, selection and budget."""
    caches = []
    for compressed in (True, False):
        store = make_store()
        store.compressed_attention, store.block_codes = compressed, block_codes
        opt = KVOptions(quant_group=GROUP)
        caches.append(KVCache(1, selection=SELECTIONS[selection](opt), options=opt, store=lambda li, s=store: s,
                              budgets=None if budget is None else [budget]))
    return caches


def run_steps(cache, q, k, v, chunks):
    """Feed (start, T) chunks of q/k/v through one layer; the outputs of every step."""
    return [cache.attend(0, q[:, :, s:s + T], k[:, :, s:s + T], v[:, :, s:s + T], start=s) for s, T in chunks]


def inputs(total, seed=0):
    return (torch.randn(B, N, total, D, generator=seeded(seed)) * 2, torch.randn(B, G, total, D, generator=seeded(seed + 1)),
            torch.randn(B, G, total, D, generator=seeded(seed + 2)))


# a prefill, a second chunk that attends over quantized groups and itself (causal), then decoding
CHUNKS = [(0, 150), (150, 70)] + [(t, 1) for t in range(220, 262)]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("residual", [0, 32])
@pytest.mark.parametrize("block_codes", [SMALL_BLOCKS, 1 << 19])
def test_kivi_compressed_attention_equals_dequantize_then_attend(bits, residual, block_codes):
    q, k, v = inputs(262)
    fast, ref = twin_caches(lambda: KiviStore(bits, GROUP, residual), block_codes=block_codes)
    outs, refs = run_steps(fast, q, k, v, CHUNKS), run_steps(ref, q, k, v, CHUNKS)
    assert fast.stores[0].kblocks.n == (261 - residual) // GROUP  # most tokens are codes, a few exact fp16
    for o, r in zip(outs, refs):
        # the same sums in another order (scales folded into the query / the weights, blocks merged
        # by the online softmax): fp32 reordering error
        torch.testing.assert_close(o, r, **REORDERED_FP32)
    exact = torch.nn.functional.scaled_dot_product_attention(q[:, :, 261:], k[:, :, :262], v[:, :, :262], enable_gqa=True)
    assert (outs[-1] - exact).abs().max() > 1e-3  # the codes are really read (not the exact keys)
    assert fast.nbytes() == ref.nbytes() == G * B * quant_nbytes_per_head(261, D, bits, GROUP, residual)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("selection", ["h2o", "window"])
def test_token_quant_compressed_attention_with_evictions(bits, selection):
    """Per-token codes under an evicting selection: H2O scores tokens by the attention
    probabilities (the compressed path returns them), evictions leave slots out of position order,
    a 5-token chunk after evictions needs the causal mask over the kept positions."""
    chunks = [(0, 100)] + [(t, 1) for t in range(100, 120)] + [(120, 5)] + [(t, 1) for t in range(125, 140)]
    q, k, v = inputs(140, seed=3)
    make = lambda: TokenQuantStore(bits, GROUP, None, 256, 65)  # noqa: E731
    fast, ref = twin_caches(make, selection, budget=64)
    outs, refs = run_steps(fast, q, k, v, chunks), run_steps(ref, q, k, v, chunks)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **REORDERED_FP32)  # fp32 reordering, as above
    assert torch.equal(fast.positions(0), ref.positions(0))  # the same tokens kept
    assert not torch.equal(fast.positions(0), torch.arange(76, 140).expand(B, G, 64)) or selection == "window"
    assert fast.nbytes() == ref.nbytes()


@pytest.mark.parametrize("store_kind", ["kivi", "token"])
def test_probabilities_and_a_read_mask_match_the_reference(store_kind):
    """Store.attend itself: a 4-query step with a per-(batch, kv head) read mask (Quest's kind),
    probabilities per stored token requested."""
    q, k, v = inputs(200, seed=5)
    stores = [KiviStore(2, GROUP, 32) if store_kind == "kivi" else TokenQuantStore(2, GROUP) for _ in range(2)]
    for store, compressed in zip(stores, (True, False)):
        store.compressed_attention, store.block_codes = compressed, SMALL_BLOCKS
        store.append(k[:, :, :196], k[:, :, :196], v[:, :, :196])
        store.settle()
        store.append(k[:, :, 196:], k[:, :, 196:], v[:, :, 196:])
    extra = torch.rand(B, G, 4, 200, generator=seeded(7)) < 0.6
    extra[..., 196:] = True  # each query still reads itself
    got = [s.attend(q[:, :, 196:], lambda s=s: s.read(torch.float32, None, 0, 196, 4), 0, 196, 4, extra, True)
           for s in stores]
    torch.testing.assert_close(got[0][0], got[1][0], **REORDERED_FP32)  # fp32 reordering
    torch.testing.assert_close(got[0][1], got[1][1], **REORDERED_FP32)
    assert got[0][1].shape == (B, N, 4, 200) and (got[0][1][..., :196].view(B, G, 3, 4, 196) * ~extra[:, :, None, :, :196]).sum() == 0


class LargestAllocation(TorchDispatchMode):
    """The bytes of the largest tensor storage any op creates while active (an output sharing an
    input's storage, a view or an out= argument, allocated nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("store_kind", ["kivi", "token"])
def test_a_decode_step_allocates_no_full_precision_copy(store_kind):
    S = 2048
    q, k, v = inputs(S + 1, seed=9)
    caches = twin_caches((lambda: KiviStore(2, GROUP, 0)) if store_kind == "kivi" else (lambda: TokenQuantStore(2, GROUP)))
    full_keys = B * G * S * D * 4  # the stored keys in fp32, what the reference path rebuilds every step
    largest = []
    for cache in caches:
        run_steps(cache, q, k, v, [(0, 512), (512, 512), (1024, 512), (1536, 512)])
        cache.attend(0, *(x[:, :, S - 1:S] for x in (q, k, v)), start=S - 1)  # warm: scratch buffers allocated
        with LargestAllocation() as alloc:
            cache.attend(0, *(x[:, :, S:S + 1] for x in (q, k, v)), start=S)
        largest.append(alloc.largest)
    assert largest[1] >= full_keys  # the check sees the reference's full copy
    assert largest[0] <= full_keys // 64, largest  # compressed: one block of 2048 codes at a time (measured 3-6 KB)


@pytest.mark.parametrize("bits,row", [(2, 32), (4, 32), (2, 16), (2, 8), (4, 4), (4, 2)])  # 8, 4, 2, 1-byte lanes
def test_unpacker_planes_equal_unpack(bits, row):
    codes = torch.randint(0, 2 ** bits, (3, 2, 5, 3, row), generator=seeded(bits * row), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits), codes)  # planar packing round trip
    flat = packed.view(3, 2, 5, -1)[:, :, 1:4]  # a block of tokens out of a larger buffer: strided
    planes = Unpacker(bits).planes(flat)  # [per, 3, 2, 3, F]
    per, rb = 8 // bits, row * bits // 8
    want = codes[:, :, 1:4].view(3, 2, 3, 3, per, rb).permute(4, 0, 1, 2, 3, 5).reshape(planes.shape)
    assert torch.equal(planes, want.float())


@pytest.mark.parametrize("store_kind", ["kivi", "token"])
def test_gradients_through_the_compressed_path_match_the_reference(store_kind):
    """A cache used with autograd on (a model decoding outside no_grad): the query's gradient
    through the folded scales equals the one through the dequantized keys and values."""
    q, k, v = inputs(100, seed=11)
    weights = torch.randn(B, N, 1, D, generator=seeded(12))
    grads = []
    for compressed in (True, False):
        store = KiviStore(4, GROUP, 0) if store_kind == "kivi" else TokenQuantStore(4, GROUP)
        store.compressed_attention, store.block_codes = compressed, SMALL_BLOCKS
        store.append(k[:, :, :99], k[:, :, :99], v[:, :, :99])
        store.settle()
        store.append(k[:, :, 99:], k[:, :, 99:], v[:, :, 99:])
        q_last = q[:, :, 99:].clone().requires_grad_()
        o, _ = store.attend(q_last, lambda s=store: s.read(torch.float32, None, 0, 99, 1), 0, 99, 1, None, False)
        (o * weights).sum().backward()
        grads.append(q_last.grad)
    torch.testing.assert_close(grads[0], grads[1], **REORDERED_FP32)  # fp32 reordering, as above


# --- rotated quantization (pikv/kv/rotated.py) and key/value bits apart ---

def rotated(bits=4, value_bits=None, group=D, capacity=0):
    return lambda: RotatedQuantStore(rotation_matrix(D, 0), bits, group, None, 256, capacity, value_bits)  # noqa: E731


def test_rotation_matrix_is_orthogonal_and_seeded():
    for dim in (32, 64, 48):  # powers of two: randomised Hadamard; else QR of a Gaussian
        R = rotation_matrix(dim, 3)
        # R R^T = I up to fp32 rounding of the fp64-built matrix (a few ulps per entry)
        torch.testing.assert_close(R @ R.T, torch.eye(dim), atol=1e-6, rtol=0)
        assert torch.equal(R, rotation_matrix(dim, 3)) and not torch.equal(R, rotation_matrix(dim, 4))
    h = rotation_matrix(32, 0) * 32 ** 0.5
    # a Hadamard matrix: every entry +-1/sqrt(D) (rounded to fp32)
    torch.testing.assert_close(h.abs(), torch.ones(32, 32), atol=1e-6, rtol=0)


@pytest.mark.parametrize("value_bits", [4, 2])
@pytest.mark.parametrize("selection", ["all", "h2o"])
def test_rotated_attention_equals_attention_over_the_rotated_back_values(value_bits, selection):
    """Compressed-domain attention of (q R) over the codes of (k R), (v R), its output rotated by
    R^T, against plain attention of q over the dequantized codes rotated back (the base class's
    path: `read` returns R^T-rotated keys/values), step by step, with H2O evicting."""
    chunks = [(0, 100)] + [(t, 1) for t in range(100, 120)] + [(120, 5)] + [(t, 1) for t in range(125, 140)]
    q, k, v = inputs(140, seed=13)
    budget = 64 if selection == "h2o" else None
    fast, ref = twin_caches(rotated(4, value_bits, capacity=65), selection, budget=budget)
    outs, refs = run_steps(fast, q, k, v, chunks), run_steps(ref, q, k, v, chunks)
    for o, r in zip(outs, refs):
        # the same sums in another order (scales folded, blocks merged) plus q R and o R^T, two
        # D-term fp32 products with an orthogonal matrix: fp32 reordering error
        torch.testing.assert_close(o, r, **REORDERED_FP32)
    assert torch.equal(fast.positions(0), ref.positions(0)) if budget else fast.length(0) == 140
    exact = torch.nn.functional.scaled_dot_product_attention(q[:, :, 139:], k[:, :, :140], v[:, :, :140], enable_gqa=True)
    assert selection == "h2o" or (outs[-1] - exact).abs().max() > 1e-3  # the codes are really read


def test_read_gives_the_keys_rotated_back_from_their_codes():
    """read() = R^T dequantize(quantize(x R)), the per-token min-max round trip written out, once
    the step is over; within it the step's own tokens read exactly."""
    _, k, v = inputs(20, seed=17)
    R = rotation_matrix(D, 0)
    store = rotated(4, 2)()
    store.append(k, k, v)
    in_step_k, in_step_v, _ = store.read(torch.float32, None, 0, 0, 20)
    torch.testing.assert_close(in_step_k, k[:, :, :20], atol=1e-5, rtol=1e-5)  # rotated there and back
    torch.testing.assert_close(in_step_v, v[:, :, :20], atol=1e-5, rtol=1e-5)
    store.settle()
    got_k, got_v, _ = store.read(torch.float32, None, 0, 0, 20)

    def roundtrip(x, bits):  # asymmetric min-max over the head dim, fp16 min and scale
        levels = 2 ** bits - 1
        mn = x.amin(-1, keepdim=True).half().float()
        scale = ((x.amax(-1, keepdim=True).half().float() - mn) / levels).clamp_min(1e-8).half().float()
        return torch.round((x - mn) / scale).clamp(0, levels) * scale + mn
    # one rotation each way in fp32: a few ulps of the values' size
    torch.testing.assert_close(got_k, roundtrip(k @ R, 4) @ R.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v, roundtrip(v @ R, 2) @ R.T, atol=1e-5, rtol=1e-5)


def test_rotation_spreads_outlier_channels_for_per_token_codes():
    """Keys with a few planted outlier channels (as RoPE'd keys have): per-token 4-bit codes over
    the whole head dim lose far less after the rotation, which spreads each outlier over all D channels."""
    _, k, v = inputs(256, seed=19)
    k[..., [3, 17]] *= 20  # two outlier channels, 20x the others
    errs = []
    for make in (lambda: TokenQuantStore(4, D), rotated(4)):
        store = make()
        store.append(k, k, v)
        store.settle()  # read through the codes (the step's own tokens read exactly)
        errs.append(float((store.read(torch.float32, None, 0, 0, 256)[0] - k).pow(2).mean()))
    assert errs[1] < errs[0] / 3, errs  # measured 4.4x lower mean squared error (seeded)


@pytest.mark.parametrize("bits,value_bits,group", [(4, 2, 32), (4, 4, 16), (2, 2, 32), (8, 4, 32), (5, 4, 32), (7, 3, 16)])
def test_nbytes_of_key_and_value_bits_apart_are_exact(bits, value_bits, group):
    """nbytes = tokens x (K codes + V codes + an fp16 scale and zero per group of each), per head
    (QuantFormat.token_bytes); the rotation adds no per-token byte (same bytes as unrotated); widths
    stored as bit slices (5 = 4 + 1, 7 = 4 + 2 + 1, 3 = 2 + 1) cost exactly their bits."""
    _, k, v = inputs(96, seed=21)
    fmt = QuantFormat(bits, value_bits, group)
    stores = [TokenQuantStore(bits, group, None, 256, 96, value_bits),
              RotatedQuantStore(rotation_matrix(D, 0), bits, group, None, 256, 96, value_bits)]
    for store in stores:
        store.append(k, k, v)
        assert store.nbytes() == B * G * 96 * fmt.token_bytes(D)
        assert store.token_bytes() == fmt.token_bytes(D)
        for name, b in (("k", bits), ("v", value_bits)):
            assert sum(x.shape[-1] for key, x in store.buf.t.items() if key.startswith(name + "c")) == D * b // 8


@pytest.mark.parametrize("bits,value_bits", [(4, 2), (2, 4), (8, 2)])
def test_key_and_value_bits_apart_pack_and_attend_as_dequantize_then_attend(bits, value_bits):
    q, k, v = inputs(140, seed=23)
    chunks = [(0, 100)] + [(t, 1) for t in range(100, 140)]
    fast, ref = twin_caches(lambda: TokenQuantStore(bits, GROUP, None, 256, 0, value_bits))
    for o, r in zip(run_steps(fast, q, k, v, chunks), run_steps(ref, q, k, v, chunks)):
        torch.testing.assert_close(o, r, **REORDERED_FP32)  # fp32 reordering, as above
    store = fast.stores[0]
    for name, x, b in (("k", k, bits), ("v", v, value_bits)):
        codes = unpack(store.buf.view(f"{name}c").view(B, G, 140, D // GROUP, -1), b)
        assert int(codes.max()) == 2 ** b - 1  # each tensor at its own width (min-max: the top code is used)
        deq = store._read(name, torch.float32)  # after settle: every token through its codes
        # within half a quantization step of the input (+ fp16 scale rounding)
        step = store.buf.view(f"{name}s").float().repeat_interleave(GROUP, -1)
        assert ((deq - x[:, :, :140]).abs() <= step * 0.5 + 1e-3).all()
