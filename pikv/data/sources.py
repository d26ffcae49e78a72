"""Readers: a source (files, a `save_to_disk` folder, a hub dataset) -> a stream of text rows.

A row is (document name, text, first): `first` marks the first row of a document. Every format
but .txt gives one document per record; a .txt file is one document, read in pieces of about
`PIECE_BYTES` so a file larger than memory streams. A piece ends after a newline that is followed
by a printable ASCII character: under GPT-2-style pre-tokenization (PiKV's BPE, GPT-2, Llama 3,
Qwen) no pre-token spans such a point, so tokenizing the pieces one by one gives exactly the
tokens of the whole file (tests/unit/test_data_prepare.py checks it).

Bad input raises `DataError` naming the file and what is wrong (the entry points print it as one
`error:` line): an empty file given by name, bytes that are not UTF-8 (with the byte offset; or
`errors="replace"` substitutes U+FFFD), a JSON line that does not parse, a record without the text
field.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

PIECE_BYTES = 1 << 20
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes
ERRORS = ("strict", "replace")
# a newline, then a printable non-space ASCII character: a pre-token boundary (module docstring)
_CUT_RE = re.compile(rb"\n(?=[!-~])")

Row = tuple[str, str, bool]


class DataError(ValueError):
    """Bad data or a bad prepared directory: one line naming the file and what is wrong."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def is_arrow_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ARROW_MARKERS)


def is_local(source: str) -> bool:
    """A path, glob or file name; anything else is a hub dataset name ("owner/name" or "name")."""
    return (Path(source).expanduser().exists() or globlib.has_magic(source) or bool(_suffix(Path(source)))
            or source.startswith((".", "/", "~")))


def local_files(source: str) -> list[Path]:
    """The data files of a local source in a fixed order: a file, an Arrow folder, or every
    .txt/.jsonl/.jsonl.gz/.parquet file (and Arrow folder) under a directory or glob."""
    path = Path(source).expanduser()
    if path.is_file() or is_arrow_dir(path):
        found = [path]
    elif path.is_dir():
        found = sorted(path.rglob("*"))
    elif globlib.has_magic(source):
        found = sorted(Path(p) for p in globlib.glob(os.path.expanduser(source), recursive=True))
    else:
        raise DataError(f"data.source {source!r}: no such file, directory or glob match (allowed: 'embedded', "
                        f"a .txt/.jsonl/.jsonl.gz/.parquet file, a save_to_disk folder, a directory or glob of "
                        f"these, a prepared directory, or a hub dataset name)")
    arrow = [p for p in found if is_arrow_dir(p)]
    files = [p.resolve() for p in found if p.is_file() and _suffix(p)
             and not any(a in p.parents for a in arrow)] + [a.resolve() for a in arrow]
    if not files:
        raise DataError(f"data.source {source!r}: no .txt, .jsonl, .jsonl.gz, .parquet file or save_to_disk "
                        f"folder found")
    return sorted(files)


def file_names(files: list[Path]) -> list[str]:
    """Unique document names: the stem, or the path below the common parent if stems clash."""
    stems = [_stem(f) for f in files]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [str(f.parent.relative_to(root) / _stem(f)) for f in files]


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[:-len(suffix)] if suffix else path.name


def _decode(data: bytes, path: Path, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: byte {offset + err.start} (0x{data[err.start]:02x}) is not valid UTF-8; "
                        f"fix the file or pass --errors replace (data.errors=replace)") from None


def read_text_file(path: Path, name: str, errors: str = "strict", piece_bytes: Optional[int] = None) -> Iterator[Row]:
    """One document in pieces of about `piece_bytes` (PIECE_BYTES), each cut at a pre-token boundary."""
    piece_bytes = piece_bytes or PIECE_BYTES
    offset, carry, first = 0, b"", True
    with open(path, "rb") as fh:
        while True:
            block = fh.read(piece_bytes)
            data = carry + block
            if not block:
                break
            cut = None
            if len(data) >= piece_bytes:
                last = None
                for last in _CUT_RE.finditer(data, max(0, len(data) - piece_bytes)):
                    pass
                cut = last.end() if last is not None else None
            if cut is None:  # no boundary yet: read on (a piece may then be longer)
                carry = data
                continue
            yield name, _decode(data[:cut], path, offset, errors), first
            offset, carry, first = offset + cut, data[cut:], False
    if carry:
        yield name, _decode(carry, path, offset, errors), first


def _record_text(record, field: str, path: Path, where: str, errors: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}: {where} has no text field {field!r} (fields: {keys}); set data.text_field "
                        f"(--text-field)")
    text = record[field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{path}: {where}: field {field!r} is a {type(text).__name__}, not text")
    return text


def read_jsonl(path: Path, name: str, field: str, errors: str = "strict") -> Iterator[Row]:
    """One document per line of a .jsonl or .jsonl.gz file, named `name:<line index>`."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as fh:
        for i, raw in enumerate(fh):
            line = _decode(raw, path, offset, errors)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {i + 1} is not JSON: {err.msg} (column {err.colno})") from None
            yield f"{name}:{i}", _record_text(record, field, path, f"line {i + 1}", errors), True


def _read_table_batches(batches, path: Path, name: str, field: str, errors: str) -> Iterator[Row]:
    row = 0
    for batch in batches:
        if field not in batch.column_names:
            raise DataError(f"{path}: no text column {field!r} (columns: {', '.join(batch.column_names)}); set "
                            f"data.text_field (--text-field)")
        for text in batch.column(field).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column {field!r} is a {type(text).__name__}, not text")
            yield f"{name}:{row}", text or "", True
            row += 1


def read_parquet(path: Path, name: str, field: str, errors: str = "strict") -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no text column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); set "
                        f"data.text_field (--text-field)")
    yield from _read_table_batches(pf.iter_batches(batch_size=1024, columns=[field]), path, name, field, errors)


def _dataset_rows(dd, label: str, name: str, field: str) -> Iterator[Row]:
    """Rows of a `datasets` Dataset or DatasetDict (splits in sorted order: `name:<split>:<row>`)."""
    splits = {"": dd} if hasattr(dd, "column_names") and isinstance(dd.column_names, list) else dict(dd)
    for split in sorted(splits):
        ds = splits[split]
        prefix = f"{name}:{split}" if split else name
        if field not in ds.column_names:
            raise DataError(f"{label}: no text column {field!r} (columns: {', '.join(ds.column_names)}); set "
                            f"data.text_field (--text-field)")
        batches = (b for b in ds.with_format("arrow").select_columns([field]).iter(batch_size=1024))
        yield from _read_table_batches(batches, label, prefix, field, "strict")


def read_arrow_dir(path: Path, name: str, field: str, errors: str = "strict") -> Iterator[Row]:
    import datasets

    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets raises several types for a bad folder
        raise DataError(f"{path}: not a readable save_to_disk folder: {err}") from None
    yield from _dataset_rows(dd, str(path), name, field)


def read_hub(source: str, field: str, hf_cache: Path) -> Iterator[Row]:
    """Every row of every split of hub dataset `source`, named `<split>:<row>`."""
    import datasets

    try:
        dd = datasets.load_dataset(source, cache_dir=str(hf_cache))
    except Exception as err:  # noqa: BLE001 - the hub raises many types; name the value
        raise DataError(f"data.source {source!r} is not a local path and could not be loaded as a hub "
                        f"dataset: {err}") from None
    for split in sorted(dd):
        yield from _dataset_rows(dd[split], f"hub dataset {source!r}", split, field)


def read_files(files: list[Path], field: str, errors: str = "strict", strict_empty: bool = False) -> Iterator[Row]:
    """Rows of local files in order. An empty file is skipped, or an error if `strict_empty`
    (the source named that one file)."""
    if errors not in ERRORS:
        raise DataError(f"errors={errors!r}: allowed values are {', '.join(ERRORS)}")
    for path, name in zip(files, file_names(files)):
        if path.is_file() and path.stat().st_size == 0:
            if strict_empty:
                raise DataError(f"{path}: empty file: no text to train on")
            continue
        suffix = _suffix(path)
        if path.is_dir():
            yield from read_arrow_dir(path, name, field, errors)
        elif suffix in TEXT_SUFFIXES:
            yield from read_text_file(path, name, errors)
        elif suffix in JSONL_SUFFIXES:
            yield from read_jsonl(path, name, field, errors)
        else:
            yield from read_parquet(path, name, field, errors)
