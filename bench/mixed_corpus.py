"""A mixed-domain training corpus for a retrofit, from text installed on a Debian machine.

  apt-get install python3-doc fortunes     # the two non-Shakespeare domains
  python bench/mixed_corpus.py --run runs/retrofit_long300 --out runs/mixed_corpus
  python train/main.py --config configs/retrofit_smollm2.yaml data.source=runs/mixed_corpus ...

Why: a retrofit on Shakespeare alone learns Shakespeare's key/value subspace; on legal text the
latent then loses to training-free methods (docs/retrofit.md, "out of domain"). This corpus mixes
three unlike domains so the compressor sees more than one:
- `run_train/`: the documents of the run's train and validation splits, read from its recorded source
  (RUN/data_split.json; for the retrofit, the embedded plays). Its held-out documents are left out, so
  text sliced from them (bench/heldout_text.py --run) stays unseen;
- `python_docs/`: the reStructuredText sources of the Python documentation (prose, code, tables), the
  folders in PYTHON_DOC_FOLDERS; the license and copyright pages are not among them;
- `fortunes/`: the `fortunes` package's files (quotations, jokes, verse, definitions), one document
  per file, the `%` separators turned into blank lines.
Each domain is capped at --cap-bytes, files taken in order (plays and fortunes by name, the Python
docs by PYTHON_DOC_FOLDERS then name), so no domain outweighs the others
by more than the cap allows. Legal text (bench/heldout_text.py --licenses) is in none of them: it is
the out-of-domain test.
"""

import argparse
import json
import sys
from pathlib import Path

from pikv.config import DataConfig
from pikv.data import load_documents

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOC_FOLDERS = ["tutorial", "howto", "faq", "reference", "using", "extending", "library"]
FORTUNES = Path("/usr/share/games/fortunes")


def run_train_docs(run: Path) -> dict[str, str]:
    """The run's train and validation documents, by name, from the source it recorded."""
    record = json.loads((run / "data_split.json").read_text())
    keep = set(record["splits"]["train"]["docs"]) | set(record["splits"]["validation"]["docs"])
    docs = {d.name: d.text for d in load_documents(DataConfig(source=record["source"])) if d.name in keep}
    if len(docs) != len(keep):
        raise ValueError(f"data.source {record['source']!r} no longer holds {sorted(keep - set(docs))} of {run}")
    return dict(sorted(docs.items()))


def python_doc_files(root: Path) -> dict[str, str]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: apt-get install python3-doc")
    # folder order first (prose before the library reference), so the cap cuts the reference
    files = [p for folder in PYTHON_DOC_FOLDERS for p in sorted((root / folder).rglob("*.rst.txt"))]
    return {"_".join(p.relative_to(root).with_suffix("").with_suffix("").parts): p.read_text() for p in files}


def fortune_files(root: Path) -> dict[str, str]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: apt-get install fortunes")
    # the plain files: not the .dat indexes, .u8 copies or links
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    return {p.name: p.read_text(errors="replace").replace("\n%\n", "\n\n") for p in files}


def capped(docs: dict[str, str], cap_bytes: int) -> dict[str, str]:
    """Documents in their given order while their UTF-8 bytes stay within the cap."""
    kept, total = {}, 0
    for name in docs:
        size = len(docs[name].encode())
        if total + size > cap_bytes:
            break
        kept[name], total = docs[name], total + size
    return kept


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the run whose held-out plays stay out")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--python-docs", type=Path, default=PYTHON_DOCS)
    ap.add_argument("--fortunes", type=Path, default=FORTUNES)
    ap.add_argument("--cap-bytes", type=int, default=4_600_000, help="per domain (the default keeps all 38 plays)")
    args = ap.parse_args(argv)
    if args.cap_bytes < 1:
        ap.error(f"--cap-bytes must be >= 1, got {args.cap_bytes}")
    domains = {"run_train": run_train_docs(args.run), "python_docs": python_doc_files(args.python_docs),
               "fortunes": fortune_files(args.fortunes)}
    for domain, docs in domains.items():
        kept = capped(docs, args.cap_bytes)
        folder = args.out / domain
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in kept.items():
            (folder / f"{name}.txt").write_bytes(text.encode())
        print(f"{folder}: {len(kept)} of {len(docs)} documents, {sum(len(t.encode()) for t in kept.values())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
