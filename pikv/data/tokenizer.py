"""Byte-level BPE: training, loading, and the exact byte length of every token.

Byte-level (GPT-2 style): text is first mapped to bytes, each byte to one of 256 printable
characters, and BPE merges those. With all 256 bytes in the initial alphabet every string
round-trips exactly (no <unk>), and every token stands for a known byte sequence, which is what
makes bits-per-byte exact rather than estimated.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # the one special token: document separator
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 257  # 256 bytes + EOT


def train_bpe(texts: Iterable[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """Byte-level BPE with exactly `vocab_size` entries (id of EOT = 0). Deterministic in
    `texts` (the trainer breaks count ties by pair order, not by thread timing); `texts` may be
    a stream (pieces of documents cut at pre-token boundaries count the same words)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"model.vocab_size={vocab_size} is too small for byte-level BPE: "
                         f"must be >= {MIN_VOCAB} (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would not round-trip; use_regex keeps GPT-2's
    # split of words/numbers/punctuation so merges never cross word boundaries.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if length is None else length)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size}: the training text only supports "
                         f"{tok.get_vocab_size()} BPE tokens; lower the vocab size or add text")
    return tok


def _from_transformers(name_or_path: str, **kwargs) -> Tokenizer:
    """The fast (tokenizers) backend of a transformers tokenizer: a model folder without a
    tokenizer.json, or a GGUF model file (needs the `gguf` package)."""
    from transformers import AutoTokenizer

    shown = str(Path(name_or_path) / kwargs["gguf_file"]) if "gguf_file" in kwargs else name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad model
        raise ValueError(f"data.tokenizer {shown!r}: transformers could not load a tokenizer: {err}") from err
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"data.tokenizer {shown!r}: transformers gave a slow tokenizer "
                         f"({type(tok).__name__}); a fast (tokenizers) one is needed")
    return tok.backend_tokenizer


def _load_gguf(path: Path) -> Tokenizer:
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files with it
    except ImportError:
        raise ValueError(f"data.tokenizer {str(path)!r}: reading a GGUF model's tokenizer needs the `gguf` "
                         f"package (pip install gguf)") from None
    return _from_transformers(str(path.parent), gguf_file=path.name)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A tokenizer.json file, a model folder (its tokenizer.json, else transformers' fast
    tokenizer), a .gguf model file, or a hub name (`from_pretrained`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return Tokenizer.from_file(str(path / TOKENIZER_FILE))
        if not (path / "tokenizer_config.json").is_file():
            raise ValueError(f"data.tokenizer {name_or_path!r}: directory has no {TOKENIZER_FILE} "
                             f"or tokenizer_config.json")
        return _from_transformers(str(path))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _load_gguf(path)
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"data.tokenizer {name_or_path!r}: not a tokenizers JSON file: {err}") from None
    if name_or_path.endswith((".json", ".gguf")) or name_or_path.startswith((".", "/", "~")):
        raise ValueError(f"data.tokenizer {name_or_path!r}: no such file")
    try:
        return Tokenizer.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise ValueError(f"data.tokenizer {name_or_path!r} is not 'bpe', a tokenizer.json, a "
                         f"directory holding one, or a loadable hub tokenizer: {err}") from err


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON: what a prepared directory and a checkpoint must agree on."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def eot_id(tokenizer: Tokenizer) -> int:
    """Id of the document separator; falls back to common EOS spellings for hub tokenizers."""
    for tok in (EOT, "</s>", "<|end_of_text|>", "<eos>", "[SEP]"):
        idx = tokenizer.token_to_id(tok)
        if idx is not None:
            return idx
    raise ValueError(f"tokenizer has no document separator token ({EOT!r} or a known EOS)")


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    return "ByteLevel" in type(tokenizer.decoder).__name__ if tokenizer.decoder else False


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """int64[vocab]: UTF-8 bytes each token id stands for; special tokens count 1 (the
    document boundary they stand for). Exact for byte-level tokenizers; for others (e.g.
    SentencePiece) the length of the decoded piece, `<0xNN>` byte-fallback tokens = 1."""
    vocab = tokenizer.get_vocab_size()
    out = np.zeros(vocab, dtype=np.int64)
    specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    byte_level = _is_byte_level(tokenizer)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    for i in range(vocab):
        tok = tokenizer.id_to_token(i)
        if i in specials or tok is None:
            out[i] = 1
        elif byte_level and set(tok) <= alphabet:
            out[i] = len(tok)  # one alphabet character per byte
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out[i] = 1
        else:
            out[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode())
    return out
