"""pikv.benchmark.seeds (bench/kv_seeds.py): pooling train/eval.py's KV results over training seeds."""

import json
from pathlib import Path

import pytest

from pikv.benchmark import seeds as kv_seeds


def _write(folder: Path, learned: list[float], window: list[float]) -> Path:
    folder.mkdir()
    rows = [{"policy": "full", "ratio": None, "nll_per_sequence": [3.0] * len(learned)},
            {"policy": "learned", "ratio": 4.0, "nll_per_sequence": learned},
            {"policy": "window", "ratio": 4.0, "nll_per_sequence": window},
            {"policy": "quant", "ratio": 8.0, "skipped": "impossible", "nll_per_sequence": None}]
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_pooled_table_reports_each_seed_and_the_seed_mean(tmp_path):
    a = _write(tmp_path / "a", [1.0, 2.0, 3.0, 4.0], [1.1, 2.1, 3.1, 4.1])  # learned better by 0.1
    b = _write(tmp_path / "b", [1.0, 2.0, 3.0, 4.0], [0.95, 1.95, 2.95, 3.95])  # worse by 0.05
    table = kv_seeds.pooled_table(kv_seeds.load_runs([a, b]), "learned")
    row = next(line for line in table.splitlines() if "| window |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "4" and cells[2] == "-0.1000, +0.0500" and cells[3] == "1/2"
    assert cells[4].startswith("-0.0250 [-0.0250, -0.0250]")  # every sequence has the same pooled delta
    assert "quant" not in table and "| full |" not in table  # skipped rows and the reference are left out


def test_runs_on_different_sequences_are_refused(tmp_path):
    a = _write(tmp_path / "a", [1.0, 2.0], [1.0, 2.0])
    b = _write(tmp_path / "b", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"different numbers of sequences \[2, 3\]"):
        kv_seeds.load_runs([a, b])
