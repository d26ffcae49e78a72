"""Flex-MoE and Time-MoE train through the real entry point (train/main.py) like the LM: under
torchrun with expert parallelism (2 processes, EP=2) the loss curve equals the single-process
run on the same global batch, a checkpoint written at EP=2 resumes in one process on the same
curve, the run directory holds the task's validation metrics and train/eval.py scores the
held-out split of the checkpoint."""

import json

import pytest

from tests.integration.conftest import REPO, SAME_CURVE_ABS, read_losses, read_metrics

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = ["train.warmup_steps=1", "train.eval_every=4", "train.checkpoint_every=2", f"train.max_steps={STEPS}",
          "logging.wandb_mode=disabled", "logging.progress=false", "model.hidden_size=32", "model.num_heads=4",
          "model.num_kv_heads=2", "model.num_experts=8", "model.expert_ffn_hidden_size=32",
          "model.ffn_hidden_size=64"]
TASKS = {
    "flex": ["--config", str(REPO / "configs" / "flex_diabetes.yaml")],
    "time": ["--config", str(REPO / "configs" / "time_statsmodels.yaml"), "model.max_seq_len=32",
             "data.seq_len=32", "time.context_len=32", "time.heads=[1,4]", "time.eval_horizons=[8]"],
}
VAL_KEY = {"flex": "val/accuracy/demographics+serum", "time": "val/snaive_mse_h8"}
HELDOUT_KEY = {"flex": "accuracy/exam", "time": "mse_h8"}


@pytest.mark.parametrize("task", ["flex", "time"])
def test_variant_trains_under_ep2_like_one_process_and_resumes(run_job, task):
    args = TASKS[task] + COMMON
    run_job(args + ["train.run_name=single", "train.batch_size=8"])
    run_job(args + ["train.run_name=ep2", "train.batch_size=4", "parallel.expert_parallel_size=2"], nproc=2)
    runs = run_job.cwd / "runs"
    single, ep2 = read_losses(runs / "single"), read_losses(runs / "ep2")
    assert sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        assert ep2[step] == pytest.approx(single[step], abs=SAME_CURVE_ABS), step
    assert single[STEPS] < single[1]
    assert VAL_KEY[task] in read_metrics(runs / "single")[STEPS]
    ckpt = runs / "ep2" / "checkpoints" / "step_2"
    run_job(args + ["train.run_name=resumed", "train.batch_size=8", f"train.resume={ckpt}"])
    resumed = read_losses(runs / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(single[step], abs=SAME_CURVE_ABS), step
    # train/eval.py scores the held-out split of a variant's checkpoint with the task's metrics
    run_job([f"--checkpoint={run_job.cwd / 'runs' / 'resumed'}"], script="train/eval.py")
    report = json.loads((run_job.cwd / "runs" / "resumed" / "eval" / "heldout_eval.json").read_text())
    assert report["task"] == task and HELDOUT_KEY[task] in report
