"""Training under expert parallelism matches the single-process run, and checkpoints reshard.

Same seed and same global batch: 1 process x 8 sequences, 2 processes (EP=2) x 4, and
4 processes (DP=2 x EP=2) x 2 see the same data, so their loss curves must agree. A checkpoint
written at EP=2 then resumes at EP=1 (one process) and at EP=4 (four processes) and continues
on the same curve: experts are stored by global index, optimizer moments included.
"""

import pytest

from tests.integration.conftest import TINY, read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = TINY + [f"train.max_steps={STEPS}", "train.checkpoint_every=3", "logging.wandb_mode=disabled"]


def _losses(run_job, name):
    rows = read_metrics(run_job.cwd / "runs" / name)
    return {s: rows[s]["loss"] for s in rows if "loss" in rows[s]}


def test_ep_training_matches_single_process_and_checkpoints_reshard(run_job):
    run_job(COMMON + ["train.run_name=single", "train.batch_size=8"])
    run_job(COMMON + ["train.run_name=ep2", "train.batch_size=4", "parallel.expert_parallel_size=2"], nproc=2)
    run_job(COMMON + ["train.run_name=dp2ep2", "train.batch_size=2", "parallel.expert_parallel_size=2"], nproc=4)
    single = _losses(run_job, "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    for name in ("ep2", "dp2ep2"):
        other = _losses(run_job, name)
        for step in range(1, STEPS + 1):
            assert other[step] == pytest.approx(single[step], abs=2e-5), (name, step)

    ep2_step3 = run_job.cwd / "runs" / "ep2" / "checkpoints" / "step_3"
    run_job(COMMON + ["train.run_name=to_ep1", "train.batch_size=8", f"train.resume={ep2_step3}"])
    run_job(COMMON + ["train.run_name=to_ep4", "train.batch_size=2", "parallel.expert_parallel_size=4",
                      f"train.resume={ep2_step3}"], nproc=4)
    for name in ("to_ep1", "to_ep4"):
        resumed = _losses(run_job, name)
        assert sorted(resumed) == [4, 5, 6], name
        for step in (4, 5, 6):
            assert resumed[step] == pytest.approx(single[step], abs=2e-5), (name, step)
