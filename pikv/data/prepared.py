"""A prepared directory, opened by memory map (written by pikv/data/prepare.py).

  manifest.json                 source, split mode, tokenizer (spec, sha256, vocab, separator id),
                                dtype, and per split: tokens, documents, bytes, shard files
  tokenizer.json                the tokenizer the tokens were made with
  data_split.json               per split: documents (names and bytes, up to 1000), bytes, tokens
  docs.json                     per split: the document names in token order
  <split>/<k>.bin               the tokens of shard k of the split, flat uint16/uint32
  <split>/<k>.idx.npy           int64 offsets of the documents' separator tokens in that shard

Opening reads only the JSON files and stats the shards, so memory and time do not grow with the
corpus; the token arrays are np.memmap views paged in on access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from pikv.data.corpus import Document
from pikv.data.sources import DataError
from pikv.data.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
SPLIT_FILE = "data_split.json"
DOCS_FILE = "docs.json"


def is_prepared(path) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def shard_paths(out: Path, split: str, k: int) -> tuple[Path, Path]:
    return out / split / f"{k:05d}.bin", out / split / f"{k:05d}.idx.npy"


class ShardedTokens:
    """Several token files as one read-only 1-D array: len(), integer/array indexing, slicing."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            lo, hi, step = idx.indices(len(self))
            return self[np.arange(lo, hi, step)]
        flat = np.asarray(idx, dtype=np.int64)
        scalar = flat.ndim == 0
        flat = flat.reshape(-1)
        flat = np.where(flat < 0, flat + len(self), flat)  # negative indices count from the end
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.shards[k][flat[sel] - self.starts[k]]
        return out[0] if scalar else out.reshape(np.shape(idx))

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.shards)
        return out if dtype is None else out.astype(dtype)


class PreparedDir:
    """`PreparedDir(path)` checks the manifest and every shard's size; `tokens(split)` maps it."""

    def __init__(self, path):
        self.path = Path(path).expanduser().resolve()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.path}: not a prepared directory (no {MANIFEST}); prepare it with "
                            f"train/prepare_data.py --source SRC --out {self.path}")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{manifest}: not valid JSON ({err.msg}, line {err.lineno}): the preparation was "
                            f"damaged; prepare it again") from None
        self.dtype = np.dtype(self.manifest["dtype"])
        for split, entry in self.manifest["splits"].items():
            for shard in entry["shards"]:
                self._check_shard(self.path / shard["file"], shard["tokens"])

    def _check_shard(self, path: Path, tokens: int) -> None:
        want = tokens * self.dtype.itemsize
        if not path.is_file():
            raise DataError(f"{path}: token shard missing (the manifest lists {tokens} tokens); prepare again")
        if path.stat().st_size != want:
            raise DataError(f"{path}: truncated or damaged token shard: {path.stat().st_size} bytes, the manifest "
                            f"says {tokens} tokens = {want} bytes; prepare again")

    @property
    def splits(self) -> dict:
        return self.manifest["splits"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    def tokenizer(self) -> Tokenizer:
        tok = load_tokenizer(str(self.path / TOKENIZER_FILE))
        if tokenizer_hash(tok) != self.tokenizer_sha256:
            raise DataError(f"{self.path / TOKENIZER_FILE}: does not match the tokenizer the shards were made with "
                            f"(sha256 differs from {MANIFEST}); prepare again")
        return tok

    def check_tokenizer(self, tokenizer: Tokenizer, what: str) -> None:
        """DataError unless `tokenizer` (named `what`) is the one the tokens were made with."""
        if tokenizer_hash(tokenizer) != self.tokenizer_sha256:
            raise DataError(f"{what} does not match the tokenizer of the prepared data {self.path} (vocab "
                            f"{tokenizer.get_vocab_size()} vs {self.manifest['tokenizer']['vocab_size']}, sha256 "
                            f"differs): the token ids would mean other text; prepare the data with this tokenizer "
                            f"(--tokenizer) or use the one in {self.path / TOKENIZER_FILE}")

    def tokens(self, split: str):
        """The split's tokens as one read-only array (np.memmap, or ShardedTokens over several)."""
        entry = self.splits[split]
        maps = [np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))
                for s in entry["shards"] if s["tokens"] > 0]
        if not maps:
            return np.zeros(0, dtype=self.dtype)
        return maps[0] if len(maps) == 1 else ShardedTokens(maps)

    def doc_starts(self, split: str) -> np.ndarray:
        """int64 offsets (in the split's token stream) of every document's separator token."""
        parts, base = [], 0
        for s in self.splits[split]["shards"]:
            parts.append(np.load(self.path / s["file"].replace(".bin", ".idx.npy")) + base)
            base += s["tokens"]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def documents(self, split: str, limit: Optional[int] = None) -> list[Document]:
        """The split's documents decoded from their tokens (exact text for a byte-level tokenizer)."""
        names = json.loads((self.path / DOCS_FILE).read_text())[split]
        tokens, tok = self.tokens(split), self.tokenizer()
        starts = list(self.doc_starts(split)) + [len(tokens)]
        count = len(names) if limit is None else min(limit, len(names))
        return [Document(names[i], tok.decode(np.asarray(tokens[starts[i] + 1:starts[i + 1]]).tolist(),
                                              skip_special_tokens=False)) for i in range(count)]
