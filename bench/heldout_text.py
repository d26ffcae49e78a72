"""Reproducible evaluation texts for a run: slices of its held-out documents, or out-of-domain text.

  python bench/heldout_text.py --run runs/retrofit_clr1e4 --chars 6000 --out runs/heldout_text/heldout_slices.txt
  python bench/heldout_text.py --licenses --out runs/heldout_text/licenses.txt

--run: the run's split as it recorded it (RUN/data_split.json: `source` and the `heldout` split's
document names); each held-out document, in that order, gives N characters starting at its middle
character (index (len - 1) // 2), the slices joined by a blank line. Cheaper to score than the whole
split, still never trained on. This regenerates docs/retrofit.md's heldout_slices.txt byte for byte.

--licenses: the license texts of /usr/share/common-licenses (LICENSES, modern legal English, not
Shakespeare: text the retrofit was not trained on) concatenated, joined by a blank line; for the
full-cache quality check of a retrofitted model outside its training domain.
"""

import argparse
import json
import sys
from pathlib import Path

from pikv.config import DataConfig
from pikv.data import load_documents

LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic"]
LICENSE_DIR = Path("/usr/share/common-licenses")
SEPARATOR = "\n\n"


def heldout_slices(run: Path, chars: int, split: str = "heldout") -> str:
    """`chars` characters from the middle of each document of the run's `split`, in recorded order."""
    record = json.loads((run / "data_split.json").read_text())
    if split not in record["splits"]:
        raise ValueError(f"split {split!r} is not in {run / 'data_split.json'}; it has {sorted(record['splits'])}")
    names = list(record["splits"][split]["docs"])
    docs = {d.name: d.text for d in load_documents(DataConfig(source=record["source"]))}
    missing = [n for n in names if n not in docs]
    if missing:
        raise ValueError(f"data.source {record['source']!r} no longer holds {missing} of {run}'s {split} split")
    slices = []
    for name in names:
        start = (len(docs[name]) - 1) // 2
        slices.append(docs[name][start:start + chars])
    return SEPARATOR.join(slices)


def license_text(directory: Path = LICENSE_DIR, names: list[str] = LICENSES) -> str:
    return SEPARATOR.join((directory / n).read_text() for n in names)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=Path, help="a run directory (its data_split.json)")
    what.add_argument("--licenses", action="store_true", help=f"the texts {LICENSES} of {LICENSE_DIR}")
    ap.add_argument("--chars", type=int, default=6000, help="--run: characters per document")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.chars < 1:
        ap.error(f"--chars must be >= 1, got {args.chars}")
    text = license_text() if args.licenses else heldout_slices(args.run, args.chars, args.split)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(text.encode())  # bytes: no newline translation, identical on every platform
    print(f"{args.out}: {len(text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
