"""Transformer: attention and RoPE vs independent references, cached decoding, parameter counts.

Shapes: B batch, T tokens, S attended tokens, H hidden, N query heads, G kv heads, D head dim.
"""

import math

import pytest
import torch

from pikv.config import ModelConfig, MoEConfig
from pikv.kv import KVCache
from pikv.models import FeedForward, Transformer
from pikv.models.transformer import RotaryEmbedding
from pikv.moe import MoELayer
from tests.helpers import REORDERED_FP32, seeded


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=48, max_seq_len=32, num_experts=4, top_k=2, expert_ffn_hidden_size=16)
    return ModelConfig(**{**base, **kw})


def naive_attention(attn, rope, x_BTH):
    B, T, _ = x_BTH.shape
    N, G, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = rope(attn.q_proj(x_BTH).view(B, T, N, D).transpose(1, 2), 0)
    k = rope(attn.k_proj(x_BTH).view(B, T, G, D).transpose(1, 2), 0)
    v = attn.v_proj(x_BTH).view(B, T, G, D).transpose(1, 2)
    k, v = k.repeat_interleave(N // G, dim=1), v.repeat_interleave(N // G, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores + torch.full((T, T), float("-inf")).triu(1)
    o = torch.softmax(scores, dim=-1) @ v
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, N * D))


def test_attention_matches_naive_reference_with_and_without_cache():
    torch.manual_seed(0)
    model = Transformer(tiny())
    attn, rope = model.layers[0].self_attn, model.rope
    x_BTH = torch.randn(2, 9, 32)
    ref = naive_attention(attn, rope, x_BTH)
    torch.testing.assert_close(attn(x_BTH, rope, 0), ref, **REORDERED_FP32)  # SDPA kernel vs explicit softmax
    cache = KVCache(model.cfg.num_layers)
    chunks = [(0, 5), (5, 8), (8, 9)]  # prefill, a 3-token chunk on a non-empty cache, 1-token decode
    out = [attn(x_BTH[:, a:b], rope, a, cache) for a, b in chunks]
    torch.testing.assert_close(torch.cat(out, dim=1), ref, **REORDERED_FP32)


def test_rope_matches_complex_rotation_and_is_relative():
    D, theta = 8, 10000.0
    rope = RotaryEmbedding(D, 64, theta)
    x = torch.randn(1, 1, 20, D, dtype=torch.float64, generator=seeded(0))
    pos = torch.arange(5, 25, dtype=torch.float64)
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    # Independent: pair (i, i + D/2) is the complex number x_i + j x_{i+D/2}, times e^{j pos w_i}.
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(
        torch.ones(20, D // 2, dtype=torch.float64), pos[:, None] * inv_freq)
    expected = torch.cat([z.real, z.imag], dim=-1)
    # fp32 rope vs float64: fp32 cos/sin of angles up to 24 rad are off by ~1e-6
    torch.testing.assert_close(rope(x.float(), 5).double(), expected, **REORDERED_FP32)

    g = seeded(1)
    q, k = torch.randn(1, 1, 1, D, generator=g), torch.randn(1, 1, 1, D, generator=g)
    dots = [(rope(q, m) * rope(k, m - 3)).sum().item() for m in (3, 10, 40)]
    assert dots == pytest.approx([dots[0]] * 3, abs=1e-5)  # the same fp32 rounding, summed over D


@pytest.mark.parametrize("every_n", [0, 1])
def test_cached_generation_matches_full_recompute(every_n):
    torch.manual_seed(1)
    model = Transformer(tiny(), MoEConfig(every_n_layers=every_n)).eval()
    prompt = torch.randint(0, 64, (2, 5))
    out = model.generate(prompt, max_new_tokens=8)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):  # no cache: full forward over the whole prefix every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq)
        cache = KVCache(model.cfg.num_layers)
        model(out[:, :5], cache)
        for t in range(5, out.shape[1] - 1):
            last = model(out[:, t:t + 1], cache)[:, -1]
        torch.testing.assert_close(last, model(out[:, :-1])[:, -1], **REORDERED_FP32)  # cached vs one pass


def test_generation_sampling_and_length_errors():
    torch.manual_seed(2)
    model = Transformer(tiny())
    prompt = torch.randint(0, 64, (2, 4))
    a = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=seeded(7))
    b = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=seeded(7))
    assert torch.equal(a, b) and a.shape == (2, 10)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1), model.generate(prompt, 6))
    with pytest.raises(ValueError, match=r"prompt length 4 \+ max_new_tokens 29 exceeds max_seq_len=32"):
        model.generate(prompt, 29)
    with pytest.raises(ValueError, match=r"exceeds max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_kv_cache_bytes_and_positions():
    torch.manual_seed(0)
    model = Transformer(tiny())
    B, T, G, D = 2, 5, 2, 8
    exact = KVCache(2, chunk_size=1)
    chunked = KVCache(2, chunk_size=16)
    with torch.no_grad():
        for cache in (exact, chunked):
            model(torch.randint(0, 64, (B, T)), cache)
            model(torch.randint(0, 64, (B, 1)), cache)
            assert cache.seq_len == T + 1 and cache.length(0) == T + 1
    payload = 2 * 2 * B * G * (T + 1) * D * 4  # layers x (k, v) x fp32 bytes
    assert exact.nbytes() == payload
    assert chunked.nbytes() == payload // (T + 1) * 16  # one 16-token chunk allocated per buffer
    assert chunked.get(1)[0].shape == (B, G, T + 1, D)


@pytest.mark.parametrize("every_n, expect", [(0, "DDDD"), (2, "DMDM"), (1, "MMMM")])
def test_layer_types(every_n, expect):
    model = Transformer(tiny(num_layers=4), MoEConfig(every_n_layers=every_n))
    kinds = "".join("M" if isinstance(b.mlp, MoELayer) else "D" for b in model.layers)
    assert kinds == expect
    assert all(isinstance(b.mlp, FeedForward) for b in model.layers if not b.is_moe)
    assert len(model.moe_layers()) == expect.count("M")
    assert Transformer(tiny(num_layers=4), MoEConfig(layers=[0])).layers[0].is_moe


@pytest.mark.parametrize("tie", [True, False])
def test_param_counts(tie):
    cfg = tiny(tie_embeddings=tie)
    model = Transformer(cfg, MoEConfig(every_n_layers=2))  # layer 0 dense, layer 1 MoE
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    assert model.num_params() == sum(seen.values())
    V, H, D = cfg.vocab_size, cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    attn = 2 * H * cfg.num_heads * D + 2 * H * cfg.num_kv_heads * D
    dense = 3 * H * cfg.ffn_hidden_size
    expert = 3 * H * cfg.expert_ffn_hidden_size
    total = V * H * (1 if tie else 2) + H + 2 * (attn + 2 * H) + dense + cfg.num_experts * (H + expert)
    assert model.num_params() == total
    active = total - (cfg.num_experts - cfg.top_k) * expert
    assert model.num_active_params() == active
    non_embed = active - (0 if tie else V * H)
    assert model.flops_per_token(16) == 6 * non_embed + 12 * 2 * H * 16


def test_router_losses():
    dense = Transformer(tiny(), MoEConfig(every_n_layers=0))
    dense(torch.zeros(1, 4, dtype=torch.long))
    assert {k: v.item() for k, v in dense.router_losses().items()} == {"aux_loss": 0.0, "z_loss": 0.0}
    moe = Transformer(tiny())
    moe(torch.zeros(1, 4, dtype=torch.long))
    losses = moe.router_losses()
    torch.testing.assert_close(losses["aux_loss"], sum(m.aux_loss for m in moe.moe_layers()))
    assert losses["z_loss"].requires_grad


def test_memorises_one_batch():
    torch.manual_seed(3)
    model = Transformer(tiny(), MoEConfig(every_n_layers=2))
    tokens = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        r = model.router_losses()
        (loss + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"]).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
