"""Text -> token ids for preparation, with a word cache where that is exact.

For a byte-level BPE with GPT-2 pre-tokenization and no normalizer (PiKV's trained BPE, GPT-2's
tokenizer.json) the ids of a text are the concatenation of the ids of its pre-tokens, and a
pre-token's ids do not depend on its context. `WordCacheEncoder` splits with the same GPT-2
pattern (Python `re`, with the Unicode letter/number/space classes spelled out from
`unicodedata`) and encodes each distinct word once: natural text repeats its words, so most
words are dictionary hits. Measured about 2x the plain `tokenizers` encode on this machine
(bench/data_prepare.py); tests compare it with `Tokenizer.encode` on Unicode-heavy text. Any
other tokenizer goes through `Tokenizer.encode_batch` unchanged.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import unicodedata

import numpy as np
from tokenizers import Tokenizer

# Unicode White_Space (what the tokenizers crate's regex means by \s)
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CACHE_LIMIT = 1 << 20  # distinct words kept per process (bounded memory on web-scale text)


def _class(first_letter: str) -> str:
    """A `re` character class body of every code point whose general category starts with
    `first_letter` (L: letters, N: numbers)."""
    parts, start = [], None
    for cp in range(sys.maxunicode + 2):
        hit = cp <= sys.maxunicode and unicodedata.category(chr(cp))[0] == first_letter
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(cp - 1))
            parts.append(a if start == cp - 1 else f"{a}-{b}")
            start = None
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenizer regex (tokenizers' ByteLevel `use_regex`) for Python `re`."""
    letters, numbers = _class("L"), _class("N")
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{_SPACE}{letters}{numbers}]+"
                      rf"|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+")


def word_cache_applies(tokenizer: Tokenizer) -> bool:
    """True when the pipeline is exactly: no normalizer, ByteLevel(use_regex, no prefix space), BPE."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and (spec.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"))


class WordCacheEncoder:
    """encode(texts) -> list of int arrays; `Tokenizer.encode` ids, computed word by word."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cached = word_cache_applies(tokenizer)
        self.cache: dict[str, list[int]] = {}
        if self.cached:
            self.pattern = gpt2_pattern()

    def _word(self, word: str) -> list[int]:
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        ids = self.cache[word] = self.tokenizer.encode(word, add_special_tokens=False).ids
        return ids

    def encode(self, texts: list[str], dtype) -> list[np.ndarray]:
        # A literal "<|endoftext|>" inside a document must stay text, not become a boundary.
        self.tokenizer.encode_special_tokens = True
        if not self.cached:
            encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=dtype) for e in encs]
        get, miss = self.cache.get, self._word
        out = []
        for text in texts:
            pieces = [get(w) or miss(w) for w in self.pattern.findall(text)]
            out.append(np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype))
        return out
