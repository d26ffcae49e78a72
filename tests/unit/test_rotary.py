"""Partial rotary (model.rotary_fraction): against transformers' GPT-NeoX partial rotary, fraction 1.0
bit-identical to full RoPE, cached decoding (plain, learned latent, SVD) equal to one pass, errors.

Shapes: B batch, T tokens, H hidden, N query heads, G kv heads, D head dim, R rotated dims.
"""

import pytest
import torch

from pikv.config import JobConfig, KVConfig, ModelConfig, MoEConfig, from_dict, to_dict
from pikv.export import check_mixtral_exportable
from pikv.kv import KVCache, calibrate_svd, make_cache
from pikv.kv.learned import KVTrainState
from pikv.models import Transformer
from pikv.models.transformer import Attention, RotaryEmbedding, rotate_half
from pikv.tasks import load_job
from tests.helpers import REORDERED_FP32, seeded

N, D, THETA = 4, 16, 10000.0


def tiny(fraction: float, **kw) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=N * D, num_layers=2, num_heads=N, num_kv_heads=2, ffn_hidden_size=64,
                max_seq_len=48, num_experts=4, top_k=2, expert_ffn_hidden_size=32, rotary_fraction=fraction)
    return ModelConfig(**{**base, **kw})


def neox_config(fraction: float):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(
        hidden_size=N * D, num_attention_heads=N, intermediate_size=64, num_hidden_layers=1, vocab_size=96,
        max_position_embeddings=64, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": fraction})
    cfg._attn_implementation = "eager"  # an explicit softmax: an independent attention kernel
    return cfg


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_rope_matches_gpt_neox_partial_rotary_at_any_position(fraction):
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb
    ours = RotaryEmbedding(D, 64, THETA, fraction)
    assert ours.rotary_dims == int(D * fraction)
    g = seeded(0)
    q, k = torch.randn(2, N, 9, D, generator=g), torch.randn(2, N, 9, D, generator=g)
    start = 7  # decoding positions: 7 .. 15
    cos, sin = GPTNeoXRotaryEmbedding(neox_config(fraction))(q, torch.arange(start, start + 9)[None])
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    # inv_freq / cos / sin are computed by the same fp32 formulas: equal to the last ulp
    torch.testing.assert_close(ours(q, start), q_ref, **REORDERED_FP32)
    torch.testing.assert_close(ours(k, start), k_ref, **REORDERED_FP32)
    R = ours.rotary_dims
    assert torch.equal(ours(q, start)[..., R:], q[..., R:])  # the position-free dims pass through untouched


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_attention_output_matches_gpt_neox_attention(fraction):
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention, GPTNeoXRotaryEmbedding
    torch.manual_seed(0)
    cfg = tiny(fraction, num_kv_heads=N)  # GPT-NeoX is multi-head attention
    ours = Attention(cfg, 0)
    rope = RotaryEmbedding(D, cfg.max_seq_len, THETA, fraction)
    hf_cfg = neox_config(fraction)
    ref = GPTNeoXAttention(hf_cfg, 0)
    with torch.no_grad():  # GPT-NeoX's fused projection holds [q_h; k_h; v_h] per head h
        w = [p.weight.view(N, D, -1) for p in (ours.q_proj, ours.k_proj, ours.v_proj)]
        ref.query_key_value.weight.copy_(torch.cat(w, dim=1).reshape(3 * N * D, -1))
        ref.dense.weight.copy_(ours.o_proj.weight)
    x_BTH = torch.randn(2, 11, N * D, generator=seeded(1))
    mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    pos_emb = GPTNeoXRotaryEmbedding(hf_cfg)(x_BTH, torch.arange(11)[None])
    expected, _ = ref(x_BTH, attention_mask=mask, position_embeddings=pos_emb)
    torch.testing.assert_close(ours(x_BTH, rope, 0), expected, **REORDERED_FP32)  # SDPA vs explicit softmax
    full = ours(x_BTH, RotaryEmbedding(D, cfg.max_seq_len, THETA), 0)
    assert (full - expected).abs().max() > 1e-3  # the partial rotary really changes the attention


def test_fraction_one_is_bit_identical_to_full_rope():
    # today's (pre-option) RoPE, transcribed: frequencies over all D dims, rotate-half over all D dims
    inv_freq = 1.0 / THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    emb = torch.cat([torch.outer(torch.arange(40, dtype=torch.float32), inv_freq)] * 2, dim=-1)
    x = torch.randn(2, N, 13, D, generator=seeded(2))
    for start in (0, 5, 27):
        cos, sin = emb.cos()[start:start + 13], emb.sin()[start:start + 13]
        assert torch.equal(RotaryEmbedding(D, 40, THETA, 1.0)(x, start), x * cos + rotate_half(x) * sin)
    assert ModelConfig().rotary_fraction == 0.5  # the default: MLA-style decoupled latent (schema.py)
    stored = to_dict(JobConfig())
    del stored["model"]["rotary_fraction"]  # a checkpoint written before the option: full rotary
    assert from_dict(stored).model.rotary_fraction == 1.0
    assert Transformer(tiny(1.0)).rope.rotary_dims == D


@pytest.mark.parametrize("fraction", [0.125, 0.5])
def test_cached_decoding_equals_one_pass(fraction):
    torch.manual_seed(4)
    model = Transformer(tiny(fraction), MoEConfig(every_n_layers=1)).eval()
    tokens = torch.randint(0, 96, (2, 20), generator=seeded(5))
    cache = KVCache(2)
    with torch.no_grad():
        ref = model(tokens)
        # prefill, a 4-token chunk on a non-empty cache, then single tokens at incremental positions
        chunks = [(0, 9), (9, 13)] + [(t, t + 1) for t in range(13, 20)]
        got = torch.cat([model(tokens[:, a:b], cache) for a, b in chunks], dim=1)
    torch.testing.assert_close(got, ref, **REORDERED_FP32)  # cache vs one pass: fp32 reordering
    out = model.generate(tokens[:, :5], max_new_tokens=6)
    seq = tokens[:, :5]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def _decode(model, tokens, cache, prefill):
    out = [model(tokens[:, :prefill], cache)[:, -1]]
    out += [model(tokens[:, t:t + 1], cache)[:, -1] for t in range(prefill, tokens.shape[1] - 1)]
    return torch.stack(out, 1)


def test_low_rank_caches_re_rotate_keys_with_partial_rotary():
    # the learned latent and SVD store pre-RoPE keys and rotate the decoded ones at their positions:
    # with partial rotary that must be the model's own partial RoPE
    torch.manual_seed(6)
    kv_cfg = KVConfig(compressor="learned", latent_bits=16, latent_window=0)
    model = Transformer(tiny(0.25), MoEConfig(every_n_layers=0), kv_cfg=kv_cfg).eval()
    tokens, prefill = torch.randint(0, 96, (2, 40), generator=seeded(7)), 16
    cache = make_cache("learned", model, ratio=4, total_tokens=40, store_dtype=torch.float32)
    with torch.no_grad():
        seq = _decode(model, tokens, cache, prefill)
        kv = KVTrainState.attach(model)
        kv.set(cache.info["rank"])
        try:  # the training-time single pass through the latent
            one_pass = model(tokens[:, :-1])[:, prefill - 1:]
        finally:
            model.set_kv_train_state(None)
        full = _decode(model, tokens, KVCache(2), prefill)
        bases = calibrate_svd(model, tokens)
        svd = _decode(model, tokens, make_cache("svd", model, ratio=1, svd_bases=bases, store_dtype=torch.float32),
                      prefill)
    torch.testing.assert_close(seq, one_pass, atol=1e-4, rtol=1e-4)  # fp32 reordering through two layers
    assert (seq - full).abs().max() > 1e-3  # the latent is really read
    # a full-rank basis from an fp32 SVD is orthogonal to ~1e-6; two layers amplify that in the logits
    torch.testing.assert_close(svd, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.5"])
def test_out_of_range_fraction_is_a_config_error(value):
    with pytest.raises(ValueError, match=r"'model.rotary_fraction' = .* is invalid: must be in \(0, 1\]"):
        load_job(None, [f"model.rotary_fraction={value}"])


def test_fraction_must_give_an_even_number_of_rotated_dims():
    # default head dim 192 / 6 = 32: 0.3 * 32 = 9.6 dims, 1/32 -> 1 dim, 0.09375 -> 3 dims (odd)
    for value in (0.3, 0.03125, 0.09375):
        with pytest.raises(ValueError, match=r"'model.rotary_fraction' = .* is invalid: must be k / 32 "
                                             r"\(head dim 32\) for an even k in \[2, 32\]"):
            load_job(None, [f"model.rotary_fraction={value}"])
    assert load_job(None, ["model.rotary_fraction=0.0625"]).model.rotary_fraction == 0.0625
    with pytest.raises(ValueError, match=r"fraction=0.3 must be k / 16"):
        RotaryEmbedding(16, 8, THETA, 0.3)


def test_partial_rotary_is_not_exportable_to_mixtral():
    cfg = JobConfig(model=ModelConfig(rotary_fraction=0.5))
    with pytest.raises(ValueError, match=r"'model.rotary_fraction' = 0.5 cannot be exported"):
        check_mixtral_exportable(cfg)
