"""Fitting the learned compressor to a frozen model (pikv/kv/fit.py): PCA optimality, distillation
that trains only the compressor, safetensors round trip, the HF Llama port with compressors."""

import pytest
import torch

from pikv.config import KVConfig, ModelConfig, MoEConfig
from pikv.kv.fit import calibrate_svd, fit_compressors, load_compressors, pca_init_, save_compressors
from pikv.config import TrainConfig
from pikv.kv.learned import KVTrainState
from pikv.kv import make_cache
from pikv.models import Transformer
from pikv.training.schedule import lr_at

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                  max_seq_len=64, rotary_fraction=1.0)  # the joint latent (a decoupled one has no 4x at head dim 16)


def model(ratios=(2.0, 4.0), bits=16, window=0, seed=0):
    torch.manual_seed(seed)
    kv = KVConfig(compressor="learned", train_ratios=list(ratios), latent_bits=bits, latent_window=window)
    return Transformer(CFG, MoEConfig(every_n_layers=0), kv_cfg=kv).eval()


def kv_vectors(m, tokens, layer):
    """Layer `layer`'s [pre-RoPE keys; values] per token, read independently of pikv.kv.fit."""
    out = {}
    attn = m.layers[layer].self_attn
    hs = [attn.k_proj.register_forward_hook(lambda mod, i, o: out.__setitem__("k", o)),
          attn.v_proj.register_forward_hook(lambda mod, i, o: out.__setitem__("v", o))]
    with torch.no_grad():
        m(tokens)
    for h in hs:
        h.remove()
    return torch.cat([out["k"], out["v"]], -1).reshape(-1, 2 * CFG.num_kv_heads * 16).double()


def test_pca_init_is_the_best_rank_r_reconstruction():
    # Eckart-Young: the rank-r error of the calibration vectors is the sum of the discarded squared
    # singular values, here computed by an SVD of the data matrix itself
    m = model(ratios=(1.0, 2.0))
    tokens = torch.randint(0, 97, (3, 40))
    pca_init_(m, tokens, batch_size=2)
    x = kv_vectors(m, tokens, 1)
    comp = m.layers[1].self_attn.kv_compressor
    s = torch.linalg.svdvals(x)
    for r in (64, 16, 5):
        w = comp.down.weight[:r].double()
        rec = (x @ w.T) @ comp.up.weight[:, :r].double().T
        assert torch.allclose((rec - x).pow(2).sum(), s[r:].pow(2).sum(), rtol=1e-6, atol=1e-8)
    assert comp.max_rank == 64  # full rank at ratio 1: an exact round trip
    assert torch.allclose(comp.up.weight.double() @ comp.down.weight.double(), torch.eye(64, dtype=torch.float64),
                          atol=1e-5)


def test_svd_bases_are_each_heads_right_singular_vectors():
    m = model()
    tokens = torch.randint(0, 97, (3, 40))
    bases = calibrate_svd(m, tokens, batch_size=2)
    x = kv_vectors(m, tokens, 1).view(-1, 2, 2, 16)  # [tokens, k/v, head, D]
    for kv in (0, 1):
        for g in range(2):
            _, _, vh = torch.linalg.svd(x[:, kv, g])
            # the same directions up to sign, in the same order
            cosines = bases[1][kv][g].double().T.mul(vh).sum(-1).abs()
            torch.testing.assert_close(cosines, torch.ones(16, dtype=torch.float64), atol=1e-4, rtol=0)


def test_fit_trains_only_the_compressor_and_lowers_its_distillation_loss():
    m = model(bits=8, window=4)
    tokens = torch.randint(0, 97, (64, 32))
    pca_init_(m, tokens[:8])
    frozen = {k: v.clone() for k, v in m.state_dict().items() if "kv_compressor" not in k}
    comp_before = m.layers[0].self_attn.kv_compressor.down.weight.clone()

    def loss_at(rank):
        m.train()
        kv = KVTrainState.attach(m)
        kv.set(rank, through_latent=False)
        with torch.no_grad():
            m.hidden_states(tokens[-16:])
        total = float(kv.pop_loss())
        m.set_kv_train_state(None)
        m.eval()
        return total

    rank4x = 16  # latent_rank(2, 16, 4, bits=8, window=4, length=32)
    before = loss_at(rank4x)
    lr_cfg = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=40, min_lr_ratio=0.1)
    log = fit_compressors(m, (tokens[i % 6 * 8:i % 6 * 8 + 8] for i in range(40)), [2.0, 4.0], steps=40,
                          length=32, lr_schedule=lambda s: lr_at(s, lr_cfg))
    assert [r for _, r, _ in log[:4]] == [52, 16, 52, 16]  # cycles the ranks of 2x and 4x
    assert loss_at(rank4x) < 0.9 * before
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(comp_before, m.layers[0].self_attn.kv_compressor.down.weight)
    assert all(p.requires_grad for p in m.parameters()) and not m.training


def test_saved_compressor_loads_into_a_fresh_model_and_decodes_the_same(tmp_path):
    m = model(bits=8, window=4)
    tokens = torch.randint(0, 97, (4, 32))
    pca_init_(m, tokens)
    save_compressors(m, tmp_path / "c.safetensors", {"steps": 0})
    fresh = model(bits=8, window=4, seed=1)
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "kv_compressor" not in k}, strict=False)
    assert load_compressors(fresh, tmp_path / "c.safetensors")["steps"] == 0
    with torch.no_grad():
        a = fresh(tokens, make_cache("learned", fresh, ratio=4.0, total_tokens=32))
        b = m(tokens, make_cache("learned", m, ratio=4.0, total_tokens=32))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"does not fit this model: .*'window': \(4, 2\)"):
        load_compressors(model(bits=8, window=2), tmp_path / "c.safetensors")


def test_hf_llama_port_with_compressors_keeps_the_logits():
    transformers = pytest.importorskip("transformers")
    from pikv.eval.hf_llama import max_logit_difference, transformer_from_hf_llama
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    ours = transformer_from_hf_llama(hf, kv_cfg=KVConfig(compressor="learned", latent_bits=8, latent_window=4))
    assert ours.layers[0].self_attn.kv_compressor is not None
    assert max_logit_difference(hf, ours, torch.randint(0, 100, (2, 24))) < 1e-4  # inactive: full K/V

