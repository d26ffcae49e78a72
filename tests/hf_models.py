"""A tiny randomly initialised Hugging Face Llama saved to disk (no download), with its own BPE
tokenizer, and the same model written as a GGUF file: the pretrained models of the
model.init_from_hf / eval.py --hf tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pikv.config import DataConfig
from pikv.data import load_documents
from pikv.data.tokenizer import EOT, train_bpe

VOCAB = 320
CHARS_PER_DOC = 12_000


def write_texts(folder: Path, docs: int = 8) -> Path:
    """`docs` .txt files: the first CHARS_PER_DOC characters of that many plays of the embedded corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    for d in load_documents(DataConfig())[:docs]:
        (folder / f"{d.name}.txt").write_text(d.text[:CHARS_PER_DOC])
    return folder


def tiny_llama(folder: Path, texts: Path, tie: bool = False, std: float = 0.2):
    """A 2-layer HF LlamaForCausalLM (hidden 64, 4 heads, 2 kv heads) with weights ~N(0, std) (large
    enough that a wrong mapping moves the logits by O(1)), saved with save_pretrained to `folder`
    with a byte-level BPE (VOCAB tokens) trained on `texts` as tokenizer.json. Returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe([p.read_text() for p in sorted(texts.glob("*.txt"))], VOCAB)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=std,
                         bos_token_id=tok.token_to_id(EOT), eos_token_id=tok.token_to_id(EOT))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return model


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py q/k permutation (rotate-half -> interleaved pairs), which
    transformers' GGUF loader reverses."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, tokenizer_json: Path, path: Path) -> Path:
    """`hf_model` (a LlamaForCausalLM) as an F32 GGUF file with its byte-level BPE tokenizer, the
    tensor names and metadata of llama.cpp's converter."""
    import gguf
    import json

    c = hf_model.config
    spec = json.loads(tokenizer_json.read_text())["model"]
    vocab = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings), w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps), w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads), w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(vocab)
    w.add_token_types([3 if t == EOT else 1 for t in vocab])  # 3 = control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(0), w.add_eos_token_id(0)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for key, value in hf_model.state_dict().items():
        key = key.removeprefix("model.").removesuffix(".weight")
        arr = value.detach().float().numpy()
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if rest == "self_attn.q_proj":
                arr = _llama_cpp_permute(arr, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                arr = _llama_cpp_permute(arr, c.num_key_value_heads)
            name = f"blk.{i}.{names[rest]}"
        else:
            name = names[key]
        w.add_tensor(f"{name}.weight", np.ascontiguousarray(arr))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path
