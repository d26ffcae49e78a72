"""Packing, the resumable data-parallel block loader, and `prepare_data` (a job's data).

Shapes: B = batch size per rank, T = seq_len. A split is one flat token array: every document
preceded by the separator `<|endoftext|>` (so each document's first token is predicted from a
boundary, as in GPT-2/nanochat). Block i is tokens[i*T : i*T + T + 1]; inputs = block[:-1],
targets = block[1:], so consecutive blocks share one token and every token after the first is a
target exactly once (the final < T tokens that do not fill a block are dropped).

The training order is Megatron-style: one global sample counter, a per-epoch permutation of
all blocks drawn from (seed, epoch), global batch = the next B * dp_size samples, rank r takes
its contiguous slice. The counter is the whole loader state, so resuming is exact and works
with a different dp_size (the global stream is the same; only the slicing changes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tokenizers import Tokenizer

from pikv.config import JobConfig
from pikv.data import corpus
from pikv.data.corpus import Document
from pikv.data.plan import PrepareSpec
from pikv.data.prepare import cached_path, prepare_cached
from pikv.data.prepared import SPLIT_FILE, PreparedDir, is_prepared
from pikv.data.sources import DataError
from pikv.data.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer, token_byte_lengths, token_dtype


def pack_documents(tokenizer: Tokenizer, docs: list[Document]) -> np.ndarray:
    """Tokenize and join: [EOT, doc0..., EOT, doc1..., ...] as uint16 (uint32 if vocab > 65536)."""
    sep = eot_id(tokenizer)
    # A literal "<|endoftext|>" inside a document must stay text, not become a boundary.
    old = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        encs = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = old
    dtype = token_dtype(tokenizer.get_vocab_size())
    parts = []
    for enc in encs:
        parts += [np.array([sep], dtype=dtype), np.asarray(enc.ids, dtype=dtype)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def num_blocks(num_tokens: int, seq_len: int) -> int:
    """Blocks of seq_len + 1 tokens at stride seq_len that fit in `num_tokens`."""
    return max(0, (num_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, block_ids: np.ndarray, seq_len: int, transform=None):
    """(inputs_BT, targets_BT) int64 tensors for the given block ids; `transform` maps the
    [B, T+1] blocks first (the retrieval probe, pikv/data/probe.py)."""
    idx = block_ids[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    blocks = np.asarray(tokens[idx], dtype=np.int64)
    blocks = torch.from_numpy(transform(blocks) if transform is not None else blocks)
    return blocks[:, :-1], blocks[:, 1:]


def _check_rank(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")


class BlockLoader:
    """Infinite shuffled block stream for one data-parallel rank; `next_batch()` -> (in, tgt)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, probe=None):
        _check_rank(batch_size, dp_rank, dp_size)
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.n_blocks = num_blocks(len(tokens), seq_len)
        if seq_len < 1 or self.n_blocks == 0:
            raise ValueError(f"seq_len={seq_len}: need 1 <= seq_len < {len(tokens)} tokens")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.probe = probe  # a PasskeyProbe: a pure function of the global sample index
        self.consumed_samples = 0  # global, over all ranks
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.n_blocks

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # cache: an epoch spans many batches
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def block_ids(self, first: int, count: int) -> np.ndarray:
        """Block ids of global samples first .. first+count-1 (may span epochs)."""
        g = np.arange(first, first + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(g // self.n_blocks):
            sel = g // self.n_blocks == epoch
            out[sel] = self._order(int(epoch))[g[sel] % self.n_blocks]
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch: (inputs_BT, targets_BT) int64."""
        first = self.consumed_samples + self.dp_rank * self.batch_size
        ids = self.block_ids(first, self.batch_size)
        self.consumed_samples += self.global_batch_size
        probe = self.probe and (lambda blocks: self.probe.insert(blocks, np.arange(first, first + self.batch_size)))
        return _gather(self.tokens, ids, self.seq_len, probe)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        # seed/seq_len/num_blocks are recorded to catch resuming onto different data.
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "seq_len": self.seq_len, "num_blocks": self.n_blocks}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len),
                          ("num_blocks", self.n_blocks)):
            if key in state and state[key] != mine:
                raise ValueError(f"loader state {key}={state[key]!r} does not match this "
                                 f"loader's {key}={mine!r}: resuming onto different data")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"loader state consumed_samples={consumed}: must be >= 0")
        self.consumed_samples = consumed


def iter_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, dp_rank: int = 0,
                      dp_size: int = 1, max_batches: Optional[int] = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed-order (inputs_BT, targets_BT) batches of a split, sharded over ranks.

    Step s covers blocks [s*B*dp, (s+1)*B*dp) in order and rank r takes its contiguous slice,
    so over all ranks each block is seen exactly once. Every rank yields the same number of
    batches (collectives in the model stay in step); in the last step the remaining blocks are
    spread evenly, so a rank's final batch may be short, or empty ([0, T]) if fewer blocks than
    ranks remain. `max_batches` caps the steps (the first blocks, same on every call).
    """
    _check_rank(batch_size, dp_rank, dp_size)
    n = num_blocks(len(tokens), seq_len)
    gbs = batch_size * dp_size
    steps = -(-n // gbs)
    if max_batches is not None:
        steps = min(steps, max_batches)
    for step in range(steps):
        lo, hi = step * gbs, min((step + 1) * gbs, n)
        if hi - lo == gbs:
            ids = np.arange(lo + dp_rank * batch_size, lo + (dp_rank + 1) * batch_size)
        else:
            ids = np.array_split(np.arange(lo, hi), dp_size)[dp_rank]
        yield _gather(tokens, ids.astype(np.int64), seq_len)


# ---------------------------------------------------------------- prepare_data


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokens: dict[str, np.ndarray]  # 'train' | 'validation' | 'heldout' -> flat token array (memory-mapped)
    split_info: dict  # what data_split.json holds: per split documents, bytes, tokens
    byte_lengths: np.ndarray  # int64[vocab], see token_byte_lengths
    tokenizer_path: Path
    eot_id: int
    cache_path: Path  # the prepared directory
    prepared: PreparedDir


def _error_file(final: Path) -> Path:
    return final.with_name(final.name + ".error")


def _build_on_main(cfg: JobConfig) -> Path:
    """The prepared directory of `cfg.data.source`: the source itself if it is one, else the
    cache entry <cache_dir>/prepared/<hash of the preparation settings> (built here if missing).
    A failure is written next to the entry, for the other ranks to report after the barrier."""
    if is_prepared(cfg.data.source):
        return Path(cfg.data.source).expanduser()
    spec = PrepareSpec.from_config(cfg)
    final = cached_path(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    _error_file(final).unlink(missing_ok=True)
    try:
        prepare_cached(spec)
    except ValueError as err:
        _error_file(final).write_text(str(err))
        raise DataError(str(err)) from None
    return final


def _located(cfg: JobConfig) -> Path:
    """The directory `_build_on_main` chose, found by the other ranks after the barrier."""
    if is_prepared(cfg.data.source):
        return Path(cfg.data.source).expanduser()
    final = cached_path(PrepareSpec.from_config(cfg))
    if _error_file(final).is_file():
        raise DataError(_error_file(final).read_text())
    if not is_prepared(final):
        raise RuntimeError(f"prepared data missing at {final} after the barrier: the cache dir "
                           f"must be shared by all ranks (set data.cache_dir or $PIKV_CACHE)")
    return final


def open_prepared(cfg: JobConfig, path: Path) -> PreparedData:
    """Open a prepared directory for a job: its tokenizer must be the job's and fit model.vocab_size."""
    prepared = PreparedDir(path)
    tok = prepared.tokenizer()
    if cfg.data.tokenizer != "bpe" and is_prepared(cfg.data.source):
        prepared.check_tokenizer(load_tokenizer(cfg.data.tokenizer), f"data.tokenizer {cfg.data.tokenizer!r}")
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise DataError(f"the tokenizer of {prepared.path} has {tok.get_vocab_size()} tokens > model.vocab_size="
                        f"{cfg.model.vocab_size}; raise model.vocab_size")
    tokens = {s: prepared.tokens(s) for s in corpus.SPLITS}
    for split, arr in tokens.items():
        if num_blocks(len(arr), cfg.data.seq_len) == 0:
            raise DataError(f"data.seq_len={cfg.data.seq_len}: the {split} split of {prepared.path} has only "
                            f"{len(arr)} tokens, fewer than seq_len + 1; lower data.seq_len or use more text")
    return PreparedData(tokenizer=tok, tokens=tokens, split_info=json.loads((prepared.path / SPLIT_FILE).read_text()),
                        byte_lengths=token_byte_lengths(tok), tokenizer_path=prepared.path / TOKENIZER_FILE,
                        eot_id=eot_id(tok), cache_path=prepared.path, prepared=prepared)


def prepare_data(cfg: JobConfig, run_dir: Optional[Path], is_main: bool,
                 barrier: Callable[[], None]) -> PreparedData:
    """Main process prepares (or finds) the data, then `barrier()`, then all open it by memory map.

    `data.source` is a prepared directory (train/prepare_data.py), or any other source, prepared
    once into the cache (pikv/data/prepare.py). With `run_dir`, main also writes
    run_dir/tokenizer.json and run_dir/data_split.json. A data error on main is raised as
    DataError on every rank (the others read it from the cache after the barrier).
    """
    final, error = None, None
    if is_main:
        try:
            final = _build_on_main(cfg)
        except DataError as err:
            error = err
    barrier()
    if error is not None:
        raise error
    data = open_prepared(cfg, final or _located(cfg))
    if is_main and run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data.cache_path / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
        shutil.copyfile(data.cache_path / SPLIT_FILE, run_dir / SPLIT_FILE)
        data.tokenizer_path = run_dir / TOKENIZER_FILE
    return data
