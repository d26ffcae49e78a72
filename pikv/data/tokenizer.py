"""Byte-level BPE: training, loading, and the exact byte length of every token.

Byte-level (GPT-2 style): text is first mapped to bytes, each byte to one of 256 printable
characters, and BPE merges those. With all 256 bytes in the initial alphabet every string
round-trips exactly (no <unk>), and every token stands for a known byte sequence, which is what
makes bits-per-byte exact rather than estimated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # the one special token: document separator
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB = 257  # 256 bytes + EOT


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with exactly `vocab_size` entries (id of EOT = 0). Deterministic in
    `texts` (the trainer breaks count ties by pair order, not by thread timing)."""
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
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size}: the training text only supports "
                         f"{tok.get_vocab_size()} BPE tokens; lower the vocab size or add text")
    return tok


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A tokenizer.json file, a directory holding one, or a hub name (`from_pretrained`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"data.tokenizer {name_or_path!r}: directory has no {TOKENIZER_FILE}")
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if name_or_path.endswith(".json") or name_or_path.startswith((".", "/", "~")):
        raise ValueError(f"data.tokenizer {name_or_path!r}: no such file")
    try:
        return Tokenizer.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise ValueError(f"data.tokenizer {name_or_path!r} is not 'bpe', a tokenizer.json, a "
                         f"directory holding one, or a loadable hub tokenizer: {err}") from err


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
