"""bench/heldout_text.py: middle slices of a run's recorded held-out documents, and the license text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "heldout_text.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def write_run(tmp_path, texts: dict, heldout: list):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in texts.items():
        (src / f"{name}.txt").write_text(text)
    run = tmp_path / "run"
    run.mkdir()
    split = {"source": str(src), "splits": {"heldout": {"docs": {n: len(texts[n]) for n in heldout}}}}
    (run / "data_split.json").write_text(json.dumps(split))
    return run


def test_slices_start_at_the_middle_character_in_recorded_order(tmp_path):
    texts = {"a": "0123456789", "b": "abcdefghijk", "c": "never held out"}
    run = write_run(tmp_path, texts, ["b", "a"])  # recorded order, not sorted
    out = tmp_path / "out.txt"
    res = run_script("--run", run, "--chars", 3, "--out", out)
    assert res.returncode == 0, res.stderr
    # b: 11 chars, middle index 5 -> "fgh"; a: 10 chars, middle index (10 - 1) // 2 = 4 -> "456"
    assert out.read_bytes() == b"fgh\n\n456"


def test_a_document_gone_from_the_source_is_an_error(tmp_path):
    run = write_run(tmp_path, {"a": "0123456789"}, ["a"])
    split = json.loads((run / "data_split.json").read_text())
    split["splits"]["heldout"]["docs"]["gone"] = 5
    (run / "data_split.json").write_text(json.dumps(split))
    res = run_script("--run", run, "--out", tmp_path / "o.txt")
    assert res.returncode != 0 and "no longer holds ['gone']" in res.stderr


@pytest.mark.skipif(not Path("/usr/share/common-licenses/GPL-3").exists(), reason="no /usr/share/common-licenses")
def test_licenses_are_the_files_joined(tmp_path):
    out = tmp_path / "lic.txt"
    assert run_script("--licenses", "--out", out).returncode == 0
    text = out.read_text()
    assert text.startswith(Path("/usr/share/common-licenses/GPL-3").read_text())
    assert text.endswith(Path("/usr/share/common-licenses/Artistic").read_text())
