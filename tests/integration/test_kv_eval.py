"""The KV story end to end: the compressor trains jointly (distillation first, then co-training; its
loss logged), train/eval.py decodes the held-out documents under every policy, runs the retrieval
probe, writes results.json / results.md / results.png and logs them to the run's (offline) W&B run."""

import json

import pytest

from tests.integration.conftest import TINY, read_metrics
from pikv.wandb_offline import history

pytestmark = pytest.mark.slow


def test_joint_compressor_training_and_kv_decoding_eval(run_job):
    run_job(TINY + ["train.run_name=kv", "train.max_steps=8", "train.checkpoint_every=8", "kv.compressor=learned",
                    "kv.train_ratios=[2,4,8]", "kv.cotrain_start=0.5", "data.probe_rate=0.5", "logging.wandb_mode=offline"])
    run_dir = run_job.cwd / "runs" / "kv"
    rows = read_metrics(run_dir)
    ranks = [rows[s]["kv_rank"] for s in range(1, 9)]
    # 2x, 4x, 8x int8 latent ranks beside the exact window (4 tokens at seq_len 64: the default 8
    # would take the whole 8x budget): the window's 4 x 128 fp16 bytes come off 64 x 128 / ratio, and
    # the other 60 tokens' codes + 2-byte scales get the rest; distillation only, then co-training
    # from step 5 cycling full (0), 2x, 4x, 8x
    assert ranks == [57, 23, 6, 57, 0, 57, 23, 6]
    assert [rows[s]["kv_cotrain"] for s in range(1, 9)] == [0] * 4 + [1] * 4
    assert all(rows[s]["kv_attn_error"] > 0 for s in range(1, 9) if ranks[s - 1]) and rows[5]["kv_attn_error"] == 0

    out = run_job.cwd / "kvout"
    proc = run_job(["--checkpoint", str(run_dir), "--kv", "full,learned,h2o,streaming,quantized,quest,svd",
                    "--ratio", "2,8", "--max-sequences", "4", "--out", str(out)], script="train/eval.py")
    report = json.loads((out / "kv" / "results.json").read_text())
    got = {(r["policy"], r["ratio"]): r for r in report["rows"]}
    assert ("full", 1.0) in got and ("learned", 2.0) in got and ("quant", 2.0) in got
    assert "impossible for quant" in got[("quant", 8.0)]["skipped"]
    for key, r in got.items():
        if r["skipped"]:
            continue
        for field in ("policy", "ratio", "compression_ratio", "perplexity", "nll", "kl", "top1_agreement",
                      "tokens_per_s", "delta_nll_ci95"):
            assert r[field] is not None, (key, field)
    assert got[("full", 1.0)]["compression_ratio"] == 1.0 and got[("full", 1.0)]["kl"] == 0
    assert 8.0 <= got[("learned", 8.0)]["compression_ratio"] < 8.5  # fills the budget up to the rank's rounding
    assert 6.0 < got[("h2o", 8.0)]["compression_ratio"] < 8.0  # positions + scores are counted
    assert got[("quest", 2.0)]["compression_ratio"] < 1.0 < got[("quest", 2.0)]["read_ratio"]
    assert "impossible for 'quest'" in got[("quest", 8.0)]["skipped"]  # 8 tokens < one 16-token page
    assert (out / "kv" / "results.png").stat().st_size > 0
    pairs = {(p["ratio"], p["other"]) for p in report["learned_vs"]}  # paired learned-minus-X intervals
    assert (8.0, "h2o") in pairs and (2.0, "quant") in pairs and len(got[("learned", 2.0)]["nll_per_sequence"]) == 4
    assert "| h2o | 8 |" in (out / "kv" / "results.md").read_text() and "| learned |" in proc.stdout
    # the retrieval probe ran for every method (the model was trained with data.probe_rate > 0)
    assert report["probe"]["full_accuracy"] == got[("full", 1.0)]["probe_accuracy"]
    assert set(got[("h2o", 8.0)]["probe_by_depth"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert "## Retrieval probe" in (out / "kv" / "results.md").read_text()
    logged = [r for r in history(run_dir) if "kv_eval/h2o@8x/delta_nll" in r]  # the offline W&B run
    assert len(logged) == 1 and logged[0]["kv_eval/h2o@8x/delta_nll"] == got[("h2o", 8.0)]["delta_nll"]
    assert logged[0]["kv_eval/results/_type"] == "table-file" and logged[0]["kv_eval/results/nrows"] == len(got)
    assert logged[0]["kv_eval/plot/_type"] == "image-file"

    bad = run_job(["--checkpoint", str(run_dir), "--kv", "h3o"], script="train/eval.py", check=False)
    assert bad.returncode == 2 and "unknown kv policy 'h3o'" in bad.stderr
