"""kvpress presses under PiKV's decoding protocol (pikv/benchmark/kvpress_decode.py), on a small
random Llama: the peak is budget + 1 tokens per layer and the measured ratio follows from it;
StreamingLLM's prefill compression and first decode step match PiKV's streaming cache (same kept
tokens); presses kvpress cannot run after every token are impossible rows with the reason.
Needs kvpress (the anchors venv, docs/kv.md); skipped elsewhere."""

import pytest
import torch

kvpress = pytest.importorskip("kvpress")
transformers = pytest.importorskip("transformers")

from pikv.benchmark.kvpress_decode import hf_decode, kvpress_rows, press_for  # noqa: E402
from pikv.eval.budget_match import dry_run_peak  # noqa: E402
from pikv.eval.decode import decode_logprobs  # noqa: E402
from pikv.eval.hf_llama import transformer_from_hf_llama  # noqa: E402
from pikv.kv import make_cache  # noqa: E402

N, P = 96, 64


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    return hf, transformer_from_hf_llama(hf, max_seq_len=128), torch.randint(0, 128, (3, N))


def test_decoded_press_keeps_the_budget_and_starts_as_pikv_streaming():
    hf, ours, seq = tiny_llama()
    full_peak = dry_run_peak(ours, make_cache("full", ours, total_tokens=N), N, P, 2)
    M = int(full_peak / 4.0 // (2 * 1 * 64 * 4)) - 1  # layers x kv heads x head dim x (K + V at 2 bytes)
    lp, _, peak = hf_decode(hf, seq, P, press_for("StreamingLLM", M, P))
    assert peak == 2 * 2 * 1 * (M + 1) * 64  # K and V, 2 layers, 1 kv head: M + 1 tokens at the peak
    ours_lp, _ = decode_logprobs(ours, seq, P, make_cache("streaming", ours, tokens=M, total_tokens=N))
    # The prefill's compression and the first decode step keep the same tokens (4 sinks + the most
    # recent) on both sides: equal up to the port's fp32 differences (1e-4 on logits of full caches).
    torch.testing.assert_close(lp[:, :2], ours_lp[:, :2], atol=1e-3, rtol=0)
    # From then on kvpress's reordered slots make its StreamingLLM evict other tokens: reported as impossible
    rows = kvpress_rows(hf, seq, P, ["StreamingLLM", "Knorm"], [4.0], full_peak, batch_size=3, progress=lambda m: None)
    assert "reorders the slots" in rows[0].skipped
    assert rows[1].compression_ratio == pytest.approx(N / (M + 1)) and rows[1].compression_ratio >= 4.0
    assert len(rows[1].nll_per_sequence) == 3 and rows[1].delta_nll_ci95[0] <= rows[1].delta_nll


def test_snapkv_press_cannot_compress_every_step_and_says_why():
    hf, ours, seq = tiny_llama()
    full_peak = dry_run_peak(ours, make_cache("full", ours, total_tokens=N), N, P, 2)
    row = kvpress_rows(hf, seq, P, ["SnapKV"], [2.0], full_peak, batch_size=3, progress=lambda m: None)[0]
    assert "kvpress SnapKV cannot compress after every decoded token" in row.skipped
    with pytest.raises(ValueError, match="unknown kvpress press 'H2O'"):
        press_for("H2O", 8, P)
