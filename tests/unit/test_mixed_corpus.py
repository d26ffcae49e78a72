"""bench/mixed_corpus.py: the run's non-held-out documents plus two other domains, each capped."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "mixed_corpus.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def make_inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = {"train_a": "alpha " * 10, "train_b": "beta " * 10, "val": "gamma " * 10, "test": "held out " * 10}
    for name, text in texts.items():
        (src / f"{name}.txt").write_text(text)
    run = tmp_path / "run"
    run.mkdir()
    splits = {"train": ["train_b", "train_a"], "validation": ["val"], "heldout": ["test"]}
    record = {"source": str(src), "splits": {k: {"docs": {n: len(texts[n]) for n in v}} for k, v in splits.items()}}
    (run / "data_split.json").write_text(json.dumps(record))
    docs = tmp_path / "pydocs"
    for rel, text in {"library/os.rst.txt": "os " * 20, "tutorial/intro.rst.txt": "intro " * 5,
                      "tutorial/more/deep.rst.txt": "deep " * 5, "c-api/skip.rst.txt": "not a chosen folder"}.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("first saying\n%\nsecond saying\n%\nthird\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01index")
    (fortunes / "wisdom.u8").write_text("a copy")
    return run, docs, fortunes


def test_held_out_documents_stay_out_and_domains_are_written(tmp_path):
    run, docs, fortunes = make_inputs(tmp_path)
    out = tmp_path / "mix"
    res = run_script("--run", run, "--out", out, "--python-docs", docs, "--fortunes", fortunes)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (out / "run_train").iterdir()) == ["train_a.txt", "train_b.txt", "val.txt"]
    assert (out / "run_train" / "val.txt").read_text() == "gamma " * 10
    # tutorial before library (PYTHON_DOC_FOLDERS order), nested paths joined by "_", c-api not chosen
    assert sorted(p.name for p in (out / "python_docs").iterdir()) == [
        "library_os.txt", "tutorial_intro.txt", "tutorial_more_deep.txt"]
    assert [p.name for p in (out / "fortunes").iterdir()] == ["wisdom.txt"]  # not the .dat / .u8 files
    assert (out / "fortunes" / "wisdom.txt").read_text() == "first saying\n\nsecond saying\n\nthird\n"


def test_the_cap_keeps_documents_in_order_while_they_fit(tmp_path):
    run, docs, fortunes = make_inputs(tmp_path)
    out = tmp_path / "mix"
    # 50 bytes per domain: train_a (60 bytes) does not fit, so nothing of run_train; the tutorial's
    # intro (30) and deep (25) pages are 55 > 50, so only intro; the fortune (35 bytes after) fits
    res = run_script("--run", run, "--out", out, "--python-docs", docs, "--fortunes", fortunes, "--cap-bytes", 50)
    assert res.returncode == 0, res.stderr
    assert not list((out / "run_train").iterdir())
    assert [p.name for p in (out / "python_docs").iterdir()] == ["tutorial_intro.txt"]
    assert [p.name for p in (out / "fortunes").iterdir()] == ["wisdom.txt"]


def test_missing_inputs_are_errors_that_say_what_to_install(tmp_path):
    run, docs, fortunes = make_inputs(tmp_path)
    res = run_script("--run", run, "--out", tmp_path / "m", "--python-docs", tmp_path / "none", "--fortunes", fortunes)
    assert res.returncode != 0 and "apt-get install python3-doc" in res.stderr
    (tmp_path / "src" / "val.txt").unlink()
    res = run_script("--run", run, "--out", tmp_path / "m", "--python-docs", docs, "--fortunes", fortunes)
    assert res.returncode != 0 and "no longer holds ['val']" in res.stderr
    assert "--cap-bytes must be >= 1" in run_script("--run", run, "--out", tmp_path / "m", "--cap-bytes", 0).stderr
