"""The jointly trained compressor's pieces: rank schedule, config checks, gradient flow, the HF Llama port."""

import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig, load_config
from pikv.tasks import load_job
from pikv.kv.latent_codes import dequantize_latent, quantize_latent
from pikv.kv.learned import KVTrainState, LatentKVCompressor, TrainSchedule, latent_rank, train_rank_schedule
from pikv.models import Transformer


def test_rank_schedule_cycles_full_and_each_trained_budget():
    assert train_rank_schedule(2, 32, [2.0, 4.0, 8.0], full_every=3) == [None, 64, 32, 16]
    assert train_rank_schedule(2, 32, [4.0], full_every=0) == [32]
    assert latent_rank(2, 32, 8) == 16


def test_int8_latent_rank_fills_the_byte_budget():
    # C = 2*2*32 = 128 numbers = 256 fp16 bytes per token; int8 codes + a 2-byte scale
    assert [latent_rank(2, 32, r, bits=8) for r in (2, 4, 8)] == [126, 62, 30]
    assert [latent_rank(2, 32, r, bits=8) + 2 for r in (2, 4, 8)] == [256 // r for r in (2, 4, 8)]
    assert latent_rank(2, 32, 1, bits=8) == 128  # never above C
    assert train_rank_schedule(2, 32, [2.0, 4.0, 8.0], full_every=3, bits=8) == [None, 126, 62, 30]


def test_exact_window_takes_its_bytes_off_the_latent_budget():
    # the default model: 256 fp16 bytes per token; a 256-token sequence keeps 8 tokens exact
    assert [latent_rank(2, 32, r, bits=8, window=8, length=256) for r in (2, 4, 8)] == [121, 55, 22]
    for r, rank in zip((2, 4, 8), (121, 55, 22)):  # within budget, and rank + 1 would not be
        assert 8 * 256 + 248 * (rank + 2) <= 256 * 256 / r < 8 * 256 + 248 * (rank + 3)
    assert train_rank_schedule(2, 32, [2.0, 8.0], full_every=0, bits=8, window=8, length=256) == [121, 22]
    with pytest.raises(ValueError, match="ratio 8 is impossible for the learned latent beside a 32-token exact window"):
        latent_rank(2, 32, 8, bits=8, window=32, length=256)  # the window alone is the whole 8x budget
    with pytest.raises(ValueError, match="window 8 needs a sequence length above it"):
        latent_rank(2, 32, 4, window=8)


@pytest.mark.parametrize("window", [0, 3])
def test_windowed_latent_attention_equals_a_naive_loop(window):
    # query p reads key j exactly when p - window < j <= p, through the latent when j <= p - window
    torch.manual_seed(0)
    comp = LatentKVCompressor(2, 8, 16, window=window)
    B, N, G, T, S, E, Dh = 1, 4, 2, 3, 9, 5, 8
    q = torch.randn(B, N, T, Dh)
    k_lat, v_lat = torch.randn(B, G, S, Dh), torch.randn(B, G, S, Dh)
    k_ex, v_ex = torch.randn(B, G, E, Dh), torch.randn(B, G, E, Dh)
    got = comp.attention(q, k_lat, v_lat, k_ex, v_ex)
    ref = torch.zeros_like(got)
    for n in range(N):
        g = n // (N // G)
        for t in range(T):
            p = S - T + t
            keys, vals = [], []
            for j in range(p + 1):
                exact = p - j < window
                keys.append(k_ex[0, g, j - (S - E)] if exact else k_lat[0, g, j])
                vals.append(v_ex[0, g, j - (S - E)] if exact else v_lat[0, g, j])
            w = torch.softmax(torch.stack(keys) @ q[0, n, t] / Dh ** 0.5, 0)
            ref[0, n, t] = w @ torch.stack(vals)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_int8_latent_round_trip_error_and_straight_through_gradient():
    torch.manual_seed(0)
    c = torch.randn(3, 5, 30) * torch.linspace(0.1, 4, 30)
    codes, scale = quantize_latent(c)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (3, 5, 1)
    err = (dequantize_latent(codes, scale, torch.float32) - c).abs()
    assert (err <= scale.float() / 2 + 1e-6).all() and codes.abs().max() == 127
    comp = LatentKVCompressor(2, 8, 16, bits=8)
    k, v = torch.randn(1, 2, 5, 8, requires_grad=True), torch.randn(1, 2, 5, 8)
    k_hat, v_hat = comp(k, v, 16)
    ref_codes, ref_scale = quantize_latent(comp.encode(k, v, 16))
    ref_k, ref_v = comp.decode(dequantize_latent(ref_codes, ref_scale, torch.float32))
    assert torch.equal(k_hat, ref_k) and torch.equal(v_hat, ref_v)  # the forward is the int8 round trip
    k_hat.sum().backward()
    fp = LatentKVCompressor(2, 8, 16, bits=16)
    fp.load_state_dict(comp.state_dict())
    k2 = k.detach().clone().requires_grad_()
    fp(k2, v, 16)[0].sum().backward()
    torch.testing.assert_close(k.grad, k2.grad)  # straight-through: the gradient of the fp16 path
    with pytest.raises(ValueError, match=r"kv latent bits 3 is not supported: allowed \(4, 8, 16\)"):
        LatentKVCompressor(2, 8, 16, bits=3)


def test_train_schedule_distills_first_then_cotrains():
    sched = TrainSchedule(2, 32, [2.0, 4.0, 8.0], full_every=3, cotrain_start=0.8, max_steps=10)
    assert [sched.at(s) for s in range(10)] == [(64, False), (32, False), (16, False)] * 2 + [
        (64, False), (32, False), (None, True), (64, True)]
    only = TrainSchedule(2, 32, [4.0], full_every=3, cotrain_start=1.0, max_steps=10)
    assert {only.at(s) for s in range(10)} == {(32, False)}


def _tiny_dense_model_with_compressor() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=32, max_seq_len=16)
    return Transformer(cfg, MoEConfig(every_n_layers=0), kv_cfg=KVConfig(compressor="learned"))


def test_compressor_does_not_change_the_models_initial_weights():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=32, max_seq_len=16)
    models = []
    for kv_cfg in (None, KVConfig(compressor="learned", latent_bits=8), KVConfig(compressor="learned", latent_bits=16)):
        torch.manual_seed(0)
        models.append(Transformer(cfg, MoEConfig(), kv_cfg=kv_cfg).state_dict())
    plain, *with_compressor = models
    for sd in with_compressor:
        assert any("kv_compressor" in k for k in sd)
        for k, v in plain.items():
            assert torch.equal(sd[k], v), k


def test_distillation_only_step_leaves_the_model_exactly_a_plain_model():
    model = _tiny_dense_model_with_compressor()
    x = torch.randint(0, 64, (2, 16))
    params = [(n, p) for n, p in model.named_parameters() if "kv_compressor" not in n]
    kv = KVTrainState.attach(model)
    ref_logits = model(x)
    ref_logits.logsumexp(-1).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in params}
    model.zero_grad()
    kv.set(8, through_latent=False)
    logits = model(x)
    distill = kv.pop_loss()
    assert torch.equal(logits, ref_logits) and distill.item() > 0
    (logits.logsumexp(-1).mean() + distill).backward()
    for n, p in params:  # the distillation term reaches no model weight
        assert torch.equal(p.grad, ref_grads[n]), n
    up = model.layers[1].self_attn.kv_compressor.up.weight
    assert up.grad[:, :8].abs().sum() > 0 and up.grad[:, 8:].abs().sum() == 0


def test_nested_rank_uses_prefix_and_full_rank_orthogonal_init_is_lossless():
    torch.manual_seed(0)
    comp = LatentKVCompressor(2, 8, 32)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    k2, v2 = comp(k, v, 32)  # C = 2*2*8 = 32: an orthogonal square projection is the identity
    torch.testing.assert_close(k2, k, atol=1e-5, rtol=1e-5)
    c8 = comp.encode(k, v, 8)
    torch.testing.assert_close(c8, comp.encode(k, v, 32)[..., :8])


def test_compressor_trains_through_lm_loss_and_distillation():
    model = _tiny_dense_model_with_compressor()
    x = torch.randint(0, 64, (2, 16))
    kv = KVTrainState.attach(model)
    kv.set(8)
    logits = model(x)
    distill = kv.pop_loss()
    assert distill is not None and distill.item() > 0
    (logits.logsumexp(-1).mean() + distill).backward()
    down = model.layers[0].self_attn.kv_compressor.down.weight
    assert down.grad is not None and down.grad[:8].abs().sum() > 0 and down.grad[8:].abs().sum() == 0
    kv.set(None)
    model.zero_grad()
    model(x).sum().backward()  # full cache: the compressor is bypassed
    assert down.grad is None or down.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="learned kv rank 999 is impossible"):
        kv.set(999)


def test_kv_config_errors():
    with pytest.raises(ValueError, match=r"'kv.compressor' = 'mla' is invalid: allowed values are auto, none, learned"):
        load_config(None, ["kv.compressor=mla"])
    with pytest.raises(ValueError, match=r"kv.train_ratios"):
        load_job(None, ["kv.train_ratios=[0.5]"])
    with pytest.raises(ValueError, match=r"'kv.latent_bits' = 6 is invalid: must be 4 .*, 8 .* or 16"):
        load_job(None, ["kv.latent_bits=6"])
    assert load_job(None, ["kv.latent_bits=4"]).kv.latent_bits == 4
    with pytest.raises(ValueError, match=r"'kv.latent_window' = 64 is invalid: must leave every kv.train_ratios"):
        load_job(None, ["kv.latent_window=64"])
    with pytest.raises(ValueError, match=r"'kv.latent_window' = -1 is invalid: must be >= 0"):
        load_job(None, ["kv.latent_window=-1"])
    with pytest.raises(ValueError, match=r"'kv.cotrain_start' = 1.5 is invalid: must be in \[0, 1\]"):
        load_config(None, ["kv.cotrain_start=1.5"])
    assert load_config(None, ["kv.compressor=none"]).kv.compressor == "none"
    assert load_config(None, []).kv.compressor == "learned"  # the default main job trains it
    # the exact window resolves to 8 tokens, fewer where it would take over half of the 8x budget
    assert load_config(None, []).kv.latent_window == 8
    assert load_config(None, ["data.seq_len=64", "model.max_seq_len=64", "kv.train_ratios=[2,4,8]"]).kv.latent_window == 4


def test_hf_llama_port_matches_logits():
    transformers = pytest.importorskip("transformers")
    from pikv.eval.hf_llama import max_logit_difference, transformer_from_hf_llama
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, rope_theta=10000.0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = transformer_from_hf_llama(hf)
    assert max_logit_difference(hf, ours, torch.randint(0, 100, (2, 24))) < 1e-4
