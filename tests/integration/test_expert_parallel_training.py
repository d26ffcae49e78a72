"""Training under expert parallelism matches the single-process run, and checkpoints reshard.

Same seed and same global batch: 1 process x 8 sequences, 2 processes (EP=2) x 4, and
4 processes (DP=2 x EP=2) x 2 see the same data, so their loss curves must agree. A checkpoint
written at EP=2 then resumes at EP=1 (one process) and at EP=4 (four processes) and continues
on the same curve: experts are stored by global index, optimizer moments included.
"""

import pytest

from tests.integration.conftest import SAME_CURVE_ABS, TINY, read_losses, read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = TINY + [f"train.max_steps={STEPS}", "train.checkpoint_every=3", "logging.wandb_mode=disabled"]


def test_ep_training_matches_single_process_and_checkpoints_reshard(run_job):
    run_job(COMMON + ["train.run_name=single", "train.batch_size=8"])
    run_job(COMMON + ["train.run_name=ep2", "train.batch_size=4", "parallel.expert_parallel_size=2"], nproc=2)
    run_job(COMMON + ["train.run_name=dp2ep2", "train.batch_size=2", "parallel.expert_parallel_size=2"], nproc=4)
    single = read_losses(run_job.cwd / "runs" / "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    for name in ("ep2", "dp2ep2"):
        other = read_losses(run_job.cwd / "runs" / name)
        for step in range(1, STEPS + 1):
            assert other[step] == pytest.approx(single[step], abs=SAME_CURVE_ABS), (name, step)

    ep2_step3 = run_job.cwd / "runs" / "ep2" / "checkpoints" / "step_3"
    run_job(COMMON + ["train.run_name=to_ep1", "train.batch_size=8", f"train.resume={ep2_step3}"])
    run_job(COMMON + ["train.run_name=to_ep4", "train.batch_size=2", "parallel.expert_parallel_size=4",
                      f"train.resume={ep2_step3}"], nproc=4)
    for name in ("to_ep1", "to_ep4"):
        resumed = read_losses(run_job.cwd / "runs" / name)
        assert sorted(resumed) == [4, 5, 6], name
        for step in (4, 5, 6):
            assert resumed[step] == pytest.approx(single[step], abs=SAME_CURVE_ABS), (name, step)


def test_aux_loss_free_bias_follows_global_counts_under_ep(run_job):
    """DeepSeek-V3 balancing: after every step, bias += rate * sign(mean load - load) with the
    step's GLOBAL counts; replaying the logged per-step counts must give the saved bias."""
    import torch

    from pikv.config import load_config
    from pikv.models import Transformer
    from pikv.training.checkpoint import load_model_weights

    overrides = COMMON + ["train.run_name=bias", "train.batch_size=4", "parallel.expert_parallel_size=2",
                          "moe.router=sigmoid_topk", "moe.aux_loss_weight=0", "moe.bias_update_rate=0.01"]
    run_job(overrides, nproc=2)
    rows = read_metrics(run_job.cwd / "runs" / "bias")
    cfg = load_config(None, overrides)
    model = Transformer(cfg.model, cfg.moe)
    load_model_weights(run_job.cwd / "runs" / "bias" / "checkpoints" / f"step_{STEPS}", model)
    for i, layer in enumerate(model.moe_layers()):
        expected = torch.zeros(cfg.model.num_experts)
        for step in range(1, STEPS + 1):
            load = torch.tensor(rows[step][f"moe/layer{i}/tokens_per_expert"], dtype=torch.float)
            expected += 0.01 * torch.sign(load.mean() - load)
        assert expected.abs().sum() > 0
        # sums of +-0.01 in fp32 round at ~1e-9 per step; one step moves the bias by 0.01
        torch.testing.assert_close(layer.router.expert_bias, expected, atol=1e-6, rtol=0)
