"""train/eval.py --probe: the retrieval probe for any model (--hf, or a checkpoint not trained on the
probe), for the full cache and every --kv method at every --ratio, in the passkey test's own wording
after the document separator (pikv.eval.probe.probe_for); --no-probe and the default."""

import json

import pytest

from pikv.data import eot_id
from pikv.data.probe import NATURAL
from tests.hf_models import tiny_llama, write_texts
from tests.integration.conftest import TINY

pytestmark = pytest.mark.slow
pytest.importorskip("transformers", reason="transformers is not installed")
LONGER = ["model.max_seq_len=128", "data.seq_len=128"]  # room for the natural wording's ~65 tokens
DEPTH_KEYS = {"0", "0.25", "0.5", "0.75", "1"}


def probe_rows(out):
    report = json.loads((out / "kv" / "results.json").read_text())
    return report.get("probe"), {(r["policy"], r["ratio"]): r for r in report["rows"]}


def assert_probe_everywhere(probe, rows, specs):
    assert probe is not None and probe["sequences"] == 16 * len(DEPTH_KEYS)  # 16 fillers x 5 depths
    for spec in [("full", 1.0)] + specs:
        r = rows[spec]
        assert set(r["probe_by_depth"]) == DEPTH_KEYS, spec
        # accuracy over all probes = the mean over depths (each depth has the same 16 fillers)
        assert r["probe_accuracy"] == pytest.approx(sum(r["probe_by_depth"].values()) / len(DEPTH_KEYS)), spec


def test_probe_on_a_pretrained_model_and_on_a_checkpoint_not_trained_on_it(run_job, tmp_path):
    from tokenizers import Tokenizer
    texts = write_texts(tmp_path / "texts")
    folder = tmp_path / "model"
    tiny_llama(folder, texts, tie=True)
    eot = eot_id(Tokenizer.from_file(str(folder / "tokenizer.json")))
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  seq_len: 128\n  source: {texts}\n")  # the natural wording: ~65 tokens of this BPE
    specs = [("h2o", 2.0), ("h2o", 4.0), ("streaming", 2.0), ("streaming", 4.0)]
    common = ["--kv", "h2o,streaming", "--ratio", "2,4", "--max-sequences", "2", "--no-wandb"]
    hf = ["--hf", str(folder), "--config", str(config)]

    run_job(hf + common + ["--probe", "--out", str(tmp_path / "on")], script="train/eval.py")
    probe, rows = probe_rows(tmp_path / "on")
    assert_probe_everywhere(probe, rows, specs)
    # not trained on the `#key|` format: the natural wording, after the document separator
    assert f"BOS token {eot} first" in probe["format"] and repr(NATURAL[0]) in probe["format"]

    run_job(hf + common + ["--out", str(tmp_path / "default")], script="train/eval.py")
    assert probe_rows(tmp_path / "default")[0] is None  # data.probe_rate = 0: off unless asked

    # a PiKV checkpoint trained without the probe: --probe turns it on with the natural wording too
    run_job(TINY + LONGER + ["train.run_name=np", "train.max_steps=2", "train.checkpoint_every=2", "logging.wandb_mode=disabled"])
    ckpt = ["--checkpoint", str(run_job.cwd / "runs" / "np")]
    run_job(ckpt + common + ["--probe", "--out", str(tmp_path / "ckpt")], script="train/eval.py")
    probe, rows = probe_rows(tmp_path / "ckpt")
    assert_probe_everywhere(probe, rows, specs)
    assert repr(NATURAL[2]) in probe["format"]

    config.write_text(f"data:\n  seq_len: 64\n  source: {texts}\n")
    short = run_job(hf + common + ["--probe"], script="train/eval.py", check=False)  # before any work
    assert short.returncode == 2 and "--probe: data.seq_len=64 cannot hold the probe's" in short.stderr
    none = run_job(hf + common + ["--probe", "--probe-windows", "0"], script="train/eval.py", check=False)
    assert none.returncode == 2 and "--probe-windows must be >= 1, got 0" in none.stderr


def test_no_probe_turns_off_the_probe_of_a_run_trained_on_it(run_job, tmp_path):
    run_job(TINY + ["train.run_name=p", "train.max_steps=2", "train.checkpoint_every=2", "data.probe_rate=0.5",
                    "logging.wandb_mode=disabled"])
    ckpt = ["--checkpoint", str(run_job.cwd / "runs" / "p"), "--kv", "h2o", "--ratio", "2", "--max-sequences", "2",
            "--no-wandb"]
    run_job(ckpt + ["--out", str(tmp_path / "default")], script="train/eval.py")
    probe, _ = probe_rows(tmp_path / "default")
    assert probe is not None and "'#'" in probe["format"] and "BOS" not in probe["format"]  # its training format
    run_job(ckpt + ["--no-probe", "--out", str(tmp_path / "off")], script="train/eval.py")
    assert probe_rows(tmp_path / "off")[0] is None
