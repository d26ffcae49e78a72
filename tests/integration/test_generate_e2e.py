"""train/generate.py on a real trained EP=2 run: under torchrun with 2 processes (experts split as in
training, all-to-all at every MoE layer) and under plain python, the same tokens."""

import json

import pytest

from tests.integration.conftest import TINY

pytestmark = pytest.mark.slow


def test_torchrun_and_python_generate_the_same_tokens_from_an_ep_run(run_job):
    # 12 steps: the logits' top-2 gaps (~1e-2) dwarf the ~1e-6 by which EP reorders fp32 sums
    run_job(TINY + ["train.run_name=ep", "train.max_steps=12", "train.checkpoint_every=12",
                    "parallel.expert_parallel_size=2", "logging.wandb_mode=disabled"], nproc=2)
    args = ["--checkpoint", str(run_job.cwd / "runs" / "ep"), "--prompt", "To be, or not to be",
            "--max-new-tokens", "12", "--kv", "h2o", "--ratio", "2"]
    two = run_job(args + ["--out", "two"], nproc=2, script="train/generate.py")
    run_job(args + ["--out", "one"], script="train/generate.py")
    r2, r1 = (json.loads((run_job.cwd / d / "generate.json").read_text()) for d in ("two", "one"))
    assert r2["token_ids"] == r1["token_ids"] and r2["text"] == r1["text"] and len(r1["token_ids"][0]) == 12
    assert r2["world_size"] == 2 and len(r2["kv_bytes_per_rank"]) == 2 and min(r2["kv_bytes_per_rank"]) > 0
    assert r2["expert_params_per_rank"] == [r1["expert_params_per_rank"][0] // 2] * 2
    assert two.stdout.count("--- prompt 0 ---") == 1 and "KV bytes per rank: [" in two.stdout  # rank 0 prints

    bad = run_job(["--checkpoint", str(run_job.cwd / "runs" / "ep"), "--prompt", "x", "--max-new-tokens", "4"],
                  nproc=3, script="train/generate.py", check=False)
    assert bad.returncode != 0 and bad.stderr.count("error: world size 3 does not divide model.num_experts=4") == 1
