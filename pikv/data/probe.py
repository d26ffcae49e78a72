"""The retrieval probe: passkey recall sequences mixed into training, and built for evaluation.

A probe sequence is ordinary text with a needle `#<key>|` hidden at some depth and, at the very
end, the query `#` followed by the key again: the last K tokens can only be predicted by finding
the needle (Mohtashami & Jaggi 2023, arXiv:2305.16300, passkey retrieval; the needle-in-a-haystack
depth sweep). Shapes: L sequence length, K key digits.

Why this format: every key digit is one token (byte-level BPE) and the K digits are distinct, so
each answer token has exactly one earlier match (an induction head solves it: Olsson et al. 2022);
`#` and `|` never occur in the embedded corpus, so the query matches only the needle. The filler
is the training block's own text, so a probe block still trains the language model on all but
2K + 3 of its tokens, which keeps its cost to held-out quality small.

`NATURAL` is the original wording of the passkey test ("The pass key is 7143. Remember it. ...
What is the pass key? The pass key is 7143"), for pretrained models that were never trained on the
`#`/`|` format (bench/kv_probe_smollm2.py). `bos_id` starts every probe with that token, for models
trained with a BOS: without it the first token is the attention sink, and a needle at depth 0 has
to be both the sink and the text to copy. PiKV's own models have no BOS (bos_id None, the default).

Training insertion is a pure function of (seed, global sample index): whether sample i is a probe,
its key and its depth come from `np.random.default_rng([seed, i, STREAM])`, so the data stream
(and so exact resume, with any number of ranks) depends only on the loader's sample counter.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from pikv.config import OptionError

STREAM = 0x50524F42  # "PROB": keeps the probe's random stream apart from the loader's
OPEN, CLOSE = "#", "|"
# (needle text before the key, needle text after it, query text before the key)
TRAINED = (OPEN, CLOSE, OPEN)
NATURAL = (" The pass key is ", ". Remember it. ", " What is the pass key? The pass key is ")


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def check_probe_rate(rate: float) -> None:
    """The fraction of training samples turned into probes (data.probe_rate)."""
    if not 0.0 <= rate <= 1.0:
        raise OptionError("rate", rate, "must be in [0, 1] (0 = no retrieval probe)")


class PasskeyProbe:
    """Builds passkey sequences for `tokenizer`; `insert` applies it to training blocks at `rate`."""

    def __init__(self, tokenizer: Tokenizer, rate: float = 0.0, seed: int = 0, key_len: int = 4,
                 wording: tuple[str, str, str] = TRAINED, bos_id: Optional[int] = None):
        check_probe_rate(rate)
        if not 1 <= key_len <= 10:
            raise ValueError(f"probe key_len={key_len}: must be in [1, 10] (distinct decimal digits)")
        digits = [_ids(tokenizer, str(d)) for d in range(10)]
        if any(len(d) != 1 for d in digits):
            raise ValueError("the retrieval probe needs every decimal digit to be one token; this "
                             f"tokenizer splits them as {digits} (set data.probe_rate=0)")
        self.digits = np.array([d[0] for d in digits], dtype=np.int64)
        self.open, self.close, self.query = (_ids(tokenizer, text) for text in wording)
        self.wording = wording
        self.bos = [] if bos_id is None else [int(bos_id)]  # a token list, like open/close/query
        self.rate, self.seed, self.key_len = rate, seed, key_len

    @property
    def overhead(self) -> int:
        """Tokens a probe adds to its filler: BOS (if any) + needle (open + key + close) + query
        (open) + answer. The BOS counts like any token, so a probe stays len(filler) tokens."""
        return len(self.bos) + len(self.open) + len(self.close) + len(self.query) + 2 * self.key_len

    def describe(self) -> str:
        before, after, query = self.wording
        bos = "".join(f"BOS token {t} first, " for t in self.bos)
        return (f"{bos}needle {before!r} + {self.key_len} distinct digits + {after!r} at a depth in ordinary "
                f"held-out text, query {query!r} at the end; recalled = every key digit is the argmax")

    def build(self, filler: np.ndarray, key: np.ndarray, pos: int) -> np.ndarray:
        """A probe of len(filler) tokens: [BOS] + filler[:pos] + needle + filler[pos:body] + query
        + key, body = len(filler) - overhead. `key` are digit values, `pos` in [0, body] (0: the
        needle comes first, right after the BOS if any)."""
        body = len(filler) - self.overhead
        if body < 0 or not 0 <= pos <= body:
            raise ValueError(f"probe needle position {pos} must be in [0, {body}] for {len(filler)} tokens")
        k = self.digits[key]
        parts = [self.bos, filler[:pos], self.open, k, self.close, filler[pos:body], self.query, k]
        return np.concatenate([np.asarray(p, dtype=filler.dtype) for p in parts])

    def random_key(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(10)[:self.key_len]

    def insert(self, blocks: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        """Training: replace each block whose sample is drawn as a probe (probability `rate`) by a
        probe built on its own text, at a uniform depth. blocks [B, T+1], sample_ids [B] global."""
        if self.rate == 0.0:
            return blocks
        out = np.array(blocks)
        body = blocks.shape[1] - self.overhead
        for b, i in enumerate(sample_ids):
            rng = np.random.default_rng([self.seed, int(i), STREAM])
            if rng.random() < self.rate:
                key = self.random_key(rng)
                out[b] = self.build(out[b], key, int(rng.integers(0, body + 1)))
        return out

    def eval_set(self, fillers: np.ndarray, depths: list[float], seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation: every filler [X, N] at every depth (fraction of the body before the needle,
        0 = first token after the BOS if any, 1 = right before the query). Returns (sequences [X*len(depths), N],
        depth of each row)."""
        rng = np.random.default_rng([seed, STREAM])
        body = fillers.shape[1] - self.overhead
        if body < 1:
            raise ValueError(f"probe sequences of {fillers.shape[1]} tokens are too short: need more "
                             f"than the {self.overhead} probe tokens")
        seqs, ds = [], []
        for filler in fillers:
            key = self.random_key(rng)
            for d in depths:
                if not 0.0 <= d <= 1.0:
                    raise ValueError(f"probe depth {d}: must be in [0, 1]")
                seqs.append(self.build(filler, key, int(round(d * body))))
                ds.append(d)
        return np.stack(seqs), np.array(ds)


def make_probe(tokenizer: Tokenizer, rate: float, seed: int, seq_len: int) -> Optional[PasskeyProbe]:
    """The training probe of a job (None when data.probe_rate = 0)."""
    if rate == 0:
        return None
    probe = PasskeyProbe(tokenizer, rate, seed)
    if seq_len + 1 <= 2 * probe.overhead:  # leave at least as much filler as probe tokens
        raise ValueError(f"data.seq_len={seq_len} is too short for the retrieval probe ({probe.overhead} "
                         f"tokens): use data.seq_len >= {2 * probe.overhead} or data.probe_rate=0")
    return probe
