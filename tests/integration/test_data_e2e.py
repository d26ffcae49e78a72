"""Data end to end: one text file trains and evaluates; a prepared directory trains under
torchrun; data and config errors are one `error:` line, exit 2, on every launcher."""

import json
import shutil

import pytest

from tests.integration.conftest import TINY, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture
def corpus_txt(run_job, pikv_cache):
    """~300 KB of the embedded plays as one text file, the nanoGPT starting point."""
    from pikv.data import fetch_shakespeare
    from pathlib import Path
    texts = sorted(fetch_shakespeare(Path(pikv_cache)).glob("*.txt"))[:3]
    path = run_job.cwd / "corpus.txt"
    path.write_text("".join(t.read_text() for t in texts))
    (run_job.cwd / "plays").mkdir()
    for t in texts:
        shutil.copy(t, run_job.cwd / "plays" / t.name)
    return path


def test_single_text_file_trains_and_evaluates(run_job, corpus_txt):
    proc = run_job(TINY + [f"data.source={corpus_txt}", "train.run_name=txt", "train.max_steps=6",
                           "train.eval_every=6", "logging.wandb_mode=disabled"])
    assert "contiguous ranges" in proc.stderr
    run_dir = run_job.cwd / "runs" / "txt"
    rows = read_metrics(run_dir)
    assert sorted(s for s in rows if "loss" in rows[s]) == list(range(1, 7)) and "val/bits_per_byte" in rows[6]
    split = json.loads((run_dir / "data_split.json").read_text())
    assert split["split_mode"] == "ranges" and split["splits"]["heldout"]["num_docs"] == 1
    run_job(["--checkpoint", str(run_dir), "--kv", "none"], script="train/eval.py")
    report = json.loads((run_dir / "eval" / "heldout_eval.json").read_text())
    assert report["documents"] == ["corpus"] and 0 < report["bits_per_byte"] < 8


def test_prepared_directory_under_torchrun_and_its_errors(run_job, corpus_txt):
    # three plays: fewer documents than the split needs, so ranges; one shard per play
    out = run_job.cwd / "prepared"
    run_job(["--source", str(corpus_txt.parent / "plays"), "--out", str(out), "--vocab-size", "512", "--num-proc", "2",
             "--shard-size-mb", "0.05"], script="train/prepare_data.py")
    assert len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]) > 2
    run_job(TINY + [f"data.source={out}", "train.run_name=prep", "train.max_steps=4"], nproc=2)
    assert sorted(read_metrics(run_job.cwd / "runs" / "prep")) == [1, 2, 3, 4]

    bad = run_job.cwd / "bad"
    shutil.copytree(out, bad)
    shard = bad / "train" / "00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    proc = run_job(TINY + [f"data.source={bad}", "train.run_name=bad"], nproc=2, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and lines == [f"error: {shard}: truncated or damaged token shard: "
                                              f"{shard.stat().st_size} bytes, the manifest says "
                                              f"{(shard.stat().st_size + 2) // 2} tokens = "
                                              f"{shard.stat().st_size + 2} bytes; prepare again"]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr

    (run_job.cwd / "broken.yaml").write_text("model: [1,2\n")
    proc = run_job(["--config", "broken.yaml"], nproc=2, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: config file broken.yaml: malformed YAML at line 2, column 1: did not find expected "
                     "',' or ']'"] and "[rank0]" not in proc.stderr


def test_data_error_in_plain_python_is_one_line(run_job):
    (run_job.cwd / "empty.txt").write_text("")
    proc = run_job(TINY + ["data.source=empty.txt"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {(run_job.cwd / 'empty.txt').resolve()}: empty file: no text to train on"
