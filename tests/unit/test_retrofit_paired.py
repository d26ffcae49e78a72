"""bench/retrofit_paired.py: per-window paired differences between train/eval.py result files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "retrofit_paired.py"


def write(path, rows, digest=None):
    report = {"rows": [{"policy": p, "ratio": r, "nll_per_sequence": v} for p, r, v in rows]}
    if digest:
        report["windows_sha256"] = digest
    path.write_text(json.dumps(report))
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_pairs_learned_rows_with_every_row_of_its_ratio_and_the_full_caches(tmp_path):
    after = write(tmp_path / "a.json", [("full", 1.0, [3.0, 3.2, 3.1]), ("learned", 4.0, [3.1, 3.3, 3.3]),
                                        ("h2o", 4.0, [3.5, 3.6, 3.4]), ("h2o", 8.0, [9.0, 9.0, 9.0])])
    press = write(tmp_path / "k.json", [("full", 1.0, [3.0, 3.2, 3.1 + 1e-6]), ("kvpress:Knorm", 4.0, [4.0, 4.0, 4.0])],
                  digest="abc")
    before = write(tmp_path / "b.json", [("full", 1.0, [3.2, 3.3, 3.3]), ("h2o", 4.0, [3.9, 3.9, 3.8])])
    res = run("--after", after, press, "--before", before)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    d = np.array([3.1, 3.3, 3.3]) - np.array([3.5, 3.6, 3.4])
    assert f"| after learned 4x | after h2o 4x | {d.mean():+.4f} [" in out
    assert "| after learned 4x | after kvpress:Knorm 4x | -0.7667 [" in out
    assert "| after learned 4x | before h2o 4x |" in out and "8x" not in out.split("windows:")[1].split("full 1x")[0]
    assert "| after full 1x | before full 1x | -0.1667 [" in out
    assert "windows check: after full 1x of" in out and "1.00e-06" in out  # the second copy, kept once
    assert run(after, before).stdout.count("| after learned 4x |") == 2  # positional form: h2o after, h2o before


def test_files_of_other_windows_are_an_error(tmp_path):
    a = write(tmp_path / "a.json", [("learned", 4.0, [1.0, 2.0])], digest="abc")
    b = write(tmp_path / "b.json", [("h2o", 4.0, [1.0, 2.0])], digest="def")
    res = run("--after", a, "--before", b)
    assert res.returncode != 0 and "the files scored different windows (windows_sha256)" in res.stderr


def test_own_full_compares_what_each_models_cache_loses(tmp_path):
    # after's full cache is 0.5 nats better (a domain gain); its latent loses 0.1 per window, before's 0.3
    after = write(tmp_path / "a.json", [("full", 1.0, [2.5, 2.7]), ("learned", 4.0, [2.6, 2.8])])
    before = write(tmp_path / "b.json", [("full", 1.0, [3.0, 3.2]), ("learned", 4.0, [3.3, 3.5])])
    plain = run("--after", after, "--before", before).stdout
    assert "| after learned 4x | before learned 4x | -0.7000 [" in plain
    res = run("--after", after, "--before", before, "--own-full")
    assert res.returncode == 0, res.stderr
    assert "| after learned 4x | before learned 4x | -0.2000 [-0.2000, -0.2000] |" in res.stdout
    no_full = write(tmp_path / "c.json", [("learned", 4.0, [3.3, 3.5])])
    res = run("--after", after, "--before", no_full, "--own-full")
    assert res.returncode != 0 and "--own-full needs a full-cache row" in res.stderr
