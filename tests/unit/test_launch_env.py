"""Which launcher started this process: torchrun, an srun step, or nothing (a world of one)."""

import pytest

from pikv.distributed.env import _launch_env

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "SLURM_STEP_NUM_TASKS", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")


@pytest.fixture
def env(monkeypatch):
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_torchrun_variables_win(env):
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                       "SLURM_STEP_NUM_TASKS": "2"}.items():
        env.setenv(key, value)
    assert _launch_env() == (3, 4, 1)


def test_srun_step_gives_rank_world_and_a_port_every_task_agrees_on(env):
    for key, value in {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2",
                       "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123"}.items():
        env.setenv(key, value)
    assert _launch_env() == (1, 2, 1)  # the step's tasks, not the allocation's
    import os
    assert os.environ["MASTER_PORT"] == "20123"


def test_batch_script_without_srun_is_a_world_of_one(env):
    # What sbatch -n2 exports to the batch script itself (measured on the test cluster).
    for key, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}.items():
        env.setenv(key, value)
    assert _launch_env() == (0, 1, 0)


@pytest.mark.parametrize("launch, prints", [({}, True), ({"RANK": "0", "WORLD_SIZE": "2"}, True),
                                            ({"RANK": "1", "WORLD_SIZE": "2"}, False),
                                            ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, False)])
def test_an_error_is_printed_by_rank_0_and_the_others_wait_for_it(env, capsys, launch, prints):
    from pikv.distributed import env as dist_env
    waits = []
    env.setattr(dist_env.time, "sleep", waits.append)
    for key, value in launch.items():
        env.setenv(key, value)
    dist_env.report_error("data.source 'x': no such file")
    err = capsys.readouterr().err
    # rank 0 prints and returns at once; any other rank is silent and waits (torchrun stops it when
    # rank 0 exits), so it cannot exit first and get rank 0 stopped before the line is out
    assert (err, waits) == (("error: data.source 'x': no such file\n", []) if prints else ("", [dist_env.ERROR_GRACE_S]))
