"""The decoupled learned latent (partial rotary: the rotated key dims held apart) and its absorbed
decode attention (pikv/kv/mla.py): against the explicit reconstruct-then-attend path, against the
reference loop of test_kv_compose, the training-time single pass, exact bytes, budget errors, and
the joint latent of full-rotary models (old checkpoints) unchanged."""

import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.kv import KVCache, make_cache
from pikv.kv.latent_codes import dequantize_latent, quantize_latent
from pikv.kv.learned import LatentKVCompressor, latent_rank
from pikv.kv.mla import MLAStore
from pikv.kv.selection import SELECTIONS
from pikv.kv.storage import LatentStore, Store
from pikv.models import Transformer
from pikv.models.transformer import RotaryEmbedding
from pikv.tasks import load_job
from tests.helpers import REORDERED_FP32, latent_single_pass, seeded
from tests.unit import test_kv_compose as compose

L, G, D, N_HEADS, N_TOK, PREFILL = 2, 2, 16, 4, 40, 16

def tiny_model(fraction: float = 0.5, bits: int = 8, window: int = 0) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=N_HEADS * D, num_layers=L, num_heads=N_HEADS, num_kv_heads=G,
                      ffn_hidden_size=64, max_seq_len=N_TOK, rotary_fraction=fraction)
    kv_cfg = KVConfig(compressor="learned", latent_bits=bits, latent_window=window)
    return Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=kv_cfg).eval()

def decode(model, tokens, cache):
    with torch.no_grad():
        out = [model(tokens[:, :PREFILL], cache)[:, -1]]
        out += [model(tokens[:, t:t + 1], cache)[:, -1] for t in range(PREFILL, tokens.shape[1] - 1)]
    return torch.stack(out, 1)

def checked_against_explicit(store, log):
    """Wrap `store.attend`: every call also runs the explicit path (keys/values reconstructed,
    LatentStore.attend) on the same state and records both outputs and probabilities."""
    absorbed = store.attend

    def attend(q, read, pos, start, T, extra, need_probs):
        got = absorbed(q, read, pos, start, T, extra, need_probs)
        want = Store.attend(store, q, read, pos, start, T, extra, True)
        log.append((T, got, want))
        return got
    store.attend = attend

@pytest.mark.parametrize("selection", ["all", "window", "h2o"])
@pytest.mark.parametrize("bits,window", [(16, 0), (8, 0), (8, 3), (16, 3), (4, 0), (4, 3)])
def test_absorbed_decode_equals_reconstruct_then_attend(selection, bits, window):
    model = tiny_model(bits=bits, window=window)
    policy = "learned" if selection == "all" else f"learned+{selection}"
    cache = make_cache(policy, model, ratio=2 if selection == "all" else 4, total_tokens=N_TOK,
                       store_dtype=torch.float32)
    assert all(type(s) is MLAStore for s in cache.stores)
    log = []
    for store in cache.stores:
        checked_against_explicit(store, log)
    decode(model, torch.randint(0, 96, (2, N_TOK), generator=seeded(1)), cache)
    decode_steps = [(got, want) for T, got, want in log if T == 1]
    assert len(decode_steps) == L * (N_TOK - 1 - PREFILL)
    for (o, p), (o_ref, p_ref) in decode_steps:
        torch.testing.assert_close(o, o_ref, **REORDERED_FP32)  # the same sums in another order
        if p is not None:  # h2o: per stored token, the window's tokens read once (exactly)
            torch.testing.assert_close(p, p_ref, **REORDERED_FP32)
    assert (selection == "h2o") == (decode_steps[0][0][1] is not None)
    if SELECTIONS[selection].evicts:
        assert cache.length(0) == cache.budgets[0]

@pytest.mark.parametrize("selection", tuple(SELECTIONS))
def test_decoupled_store_equals_the_reference_loop(selection):
    """test_kv_compose's reference loop with the decoupled storage: int8 rotated key dims after
    RoPE (one scale per token over the kv heads), int8 latent of the other key dims and values."""
    P = D // 2
    rope = RotaryEmbedding(compose.D, compose.TOTAL, 10000.0, 0.5)
    torch.manual_seed(0)
    comp = LatentKVCompressor(compose.G, compose.D, 2 * compose.G * compose.D - compose.G * P, bits=8,
                              window=compose.WINDOW, rotary_dims=P)

    class Reference(compose.Reference):
        def stored(self, b, pos, k_pre, k, v):
            c = self.comp.encode(k[None, :, None], v[None, :, None], compose.RANK)
            k_dec, v_dec = self.comp.decode(dequantize_latent(*quantize_latent(c), torch.float32))
            k_rot = dequantize_latent(*quantize_latent(k[:, :P], (0, 1)), torch.float32)  # one scale over [G, P]
            return torch.cat([k_rot, k_dec[0, :, 0]], -1), v_dec[0, :, 0]

    store = MLAStore(comp, compose.RANK, torch.float32)
    cache = KVCache(1, selection=SELECTIONS[selection](compose.OPT), budgets=[compose.BUDGET], options=compose.OPT,
                    store_dtype=torch.float32, store=lambda li: store)
    ref = Reference("learned", selection, rope, comp)
    B, N, T = compose.B, compose.N, compose.TOTAL
    q = torch.randn(B, N, T, compose.D, generator=seeded(1)) * 2
    k_pre = torch.randn(B, compose.G, T, compose.D, generator=seeded(2))
    v = torch.randn(B, compose.G, T, compose.D, generator=seeded(3))
    k = rope(k_pre, 0)
    steps = [(0, compose.PREFILL)] + [(t, t + 1) for t in range(compose.PREFILL, 30)] + [(30, 33)] + [
        (t, t + 1) for t in range(33, T)]
    with torch.no_grad():
        for a, e in steps:
            sl = slice(a, e)
            got = cache.attend(0, q[:, :, sl], k[:, :, sl], v[:, :, sl], k_pre_BGTD=k_pre[:, :, sl], rope=rope, start=a)
            torch.testing.assert_close(got, ref.step(q[:, :, sl], k_pre[:, :, sl], k[:, :, sl], v[:, :, sl], a),
                                       **REORDERED_FP32)
            if SELECTIONS[selection].evicts:
                for b in range(B):
                    assert compose.cache_positions(cache, b, 0) == ref.kept(b, 0), (a, b)

@pytest.mark.parametrize("bits,window", [(16, 0), (8, 0), (8, 3), (4, 0), (4, 3)])
def test_decode_from_the_cache_equals_the_single_pass_and_bytes_are_exact(bits, window):
    model = tiny_model(bits=bits, window=window)
    tokens = torch.randint(0, 96, (2, N_TOK), generator=seeded(4))
    cache = make_cache("learned", model, ratio=2, total_tokens=N_TOK, store_dtype=torch.float32)
    seq = decode(model, tokens, cache)
    one_pass, full = latent_single_pass(model, tokens, cache.info["rank"], PREFILL)
    # fp32 reordering through two layers; an int8 code may round the other way (both are right)
    torch.testing.assert_close(seq, one_pass, atol=1e-4, rtol=1e-4)
    assert (seq - full).abs().max() > 1e-3  # the latent is really read
    # bytes: per latent-held token the codes (fp32 here / int8 + fp16 scale / int4 packed in pairs +
    # an fp16 scale per 32 coordinates) and the G * P rotated dims (fp32 / int8 + fp16 scale); the
    # window's keys + values exact (fp32 here); buffers sized for N_TOK
    P, rank = D // 2, cache.info["rank"]
    codes = {16: rank * 4, 8: rank + 2, 4: (rank + 1) // 2 + 2 * ((rank + 31) // 32)}[bits]
    per_token = codes + (G * P * 4 if bits == 16 else G * P + 2)
    assert cache.nbytes() == L * 2 * ((N_TOK - window) * per_token + window * 2 * G * D * 4)
    fp16 = make_cache("learned", model, ratio=2, total_tokens=N_TOK)  # the budget holds in the fp16 cache
    decode(model, tokens, fp16)
    assert L * 2 * N_TOK * 4 * G * D / fp16.peak_nbytes >= 2.0

def test_rank_counts_the_rotated_dims_and_impossible_ratios_say_what_is_possible():
    # the default model (G=2, D=32) at half rotary: 16 rotated dims per kv head, 256 fp16 bytes per token
    assert latent_rank(2, 32, 4, bits=8, rotary_dims=16) == 64 - (2 * 16 + 2) - 2
    assert latent_rank(2, 32, 4, bits=16, rotary_dims=8) == (64 - 2 * 8 * 2) // 2
    assert latent_rank(2, 32, 1, bits=16, rotary_dims=16) == 2 * (64 - 16)  # never above what it compresses
    with pytest.raises(ValueError, match=r"ratio 8 is impossible for the decoupled learned latent: the 16 rotary "
                                         r"key dims of each of 2 kv heads take 34 bytes per token of the 32.0 it "
                                         r"allows.*possible: ratio <= 6.91"):
        latent_rank(2, 32, 8, bits=8, rotary_dims=16)
    with pytest.raises(ValueError, match=r"ratio 4 is impossible for the decoupled learned latent beside a 8-token "
                                         r"exact window over 256 tokens: the 16 rotary key dims.*take 64 bytes"):
        latent_rank(2, 32, 4, bits=16, window=8, length=256, rotary_dims=16)
    assert 256 / 6.91 >= 34 + 1 + 2 > 256 / 6.92  # the bound: rotated dims + a rank-1 int8 latent
    with pytest.raises(ValueError, match=r"'kv.train_ratios' = \[2.0, 4.0, 8.0\] is invalid: .*ratio 8.0 is "
                                         r"impossible for the decoupled learned latent.*16 rotary key dims"):
        load_job(None, ["kv.train_ratios=[2,4,8]"])
    with pytest.raises(ValueError, match=r"ratio 16 is impossible for the decoupled learned latent"):
        make_cache("learned", tiny_model(), ratio=16, total_tokens=N_TOK)

def test_full_rotary_models_keep_the_joint_latent():
    # full rotary (every checkpoint before partial rotary): the same compressor shapes, the joint store
    model = tiny_model(fraction=1.0)
    comp = model.layers[0].self_attn.kv_compressor
    assert comp.rot == 0 and comp.down.weight.shape == (latent_rank(G, D, 2.0, 8), 2 * G * D)
    assert all(type(s) is LatentStore for s in make_cache("learned", model, ratio=4, total_tokens=N_TOK).stores)
    decoupled = tiny_model(fraction=0.5).layers[0].self_attn.kv_compressor
    assert decoupled.rot == D // 2 and decoupled.down.weight.shape[1] == G * (2 * D - D // 2)
    with pytest.raises(ValueError, match="MLAStore needs a decoupled latent"):
        MLAStore(comp, 4, torch.float32)
    assert latent_rank(G, D, 4.0, 8) == G * D - 2  # the joint budget as before


def test_pca_init_of_the_decoupled_latent_is_the_best_rank_r_projection():
    # pikv/kv/fit.py pca_init_: the principal directions of what the latent encodes (position-free
    # key dims + values), so its squared reconstruction error is the energy its top-r eigenvalues miss
    from pikv.kv.fit import pca_init_
    model = tiny_model(bits=16)
    tokens = torch.randint(0, 96, (4, N_TOK), generator=seeded(5))
    vals = pca_init_(model, tokens)
    attn = model.layers[0].self_attn
    comp, seen = attn.kv_compressor, {}
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    with torch.no_grad():
        model.hidden_states(tokens)
        hook.remove()
        x = seen["x"]
        k = attn.k_proj(x).view(4, N_TOK, G, D).transpose(1, 2)
        v = attn.v_proj(x).view(4, N_TOK, G, D).transpose(1, 2)
        for rank in (4, comp.max_rank):
            k_dec, v_dec = comp.decode(comp.encode(k, v, rank))
            err = (k_dec - k[..., comp.rot:]).pow(2).sum() + (v_dec - v).pow(2).sum()
            total = k[..., comp.rot:].pow(2).sum() + v.pow(2).sum()
            # fp32 encode/decode vs float64 eigenvalues: relative 1e-4 of the total energy
            assert abs(float(err) - (float(total) - float(vals[0][:rank].sum()))) < 1e-4 * float(total)
        assert float(err) > 1e-3 * float(total)  # the rank really drops something
