"""The start-up checks of a multi-node job, on one machine (no cluster, no root): the shared run
directory check (forked gloo ranks) and the bounded rendezvous naming its endpoint."""

import socket
import time
from pathlib import Path

import pytest
import torch

from pikv.distributed.env import DistContext, RendezvousError, init_distributed, rendezvous_timeout_s
from pikv.distributed.shared_fs import RunDirNotSharedError, check_shared_run_dir
from pikv.testing import run_distributed


def _check(rank: int, world: int, dirs: list[str]) -> str:
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), ep_size=1)
    try:
        check_shared_run_dir(Path(dirs[rank]), ctx)
    except RunDirNotSharedError as err:
        return str(err)
    return "ok"


def test_shared_run_directory_passes_and_leaves_no_file(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    assert run_distributed(_check, 3, [str(run_dir)] * 3) == ["ok"] * 3
    assert list(run_dir.iterdir()) == []  # the probe file is gone


def test_ranks_seeing_different_directories_all_stop_naming_who_cannot_see(tmp_path):
    dirs = [str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "b")]
    results = run_distributed(_check, 3, dirs)
    host = socket.gethostname()
    expected = (f"the run directory is not shared by all ranks: rank 0 on {host} wrote a file into {tmp_path}/a, "
                f"which rank 2 on {host} ({tmp_path}/b) cannot see")
    assert all(r.startswith(expected) for r in results), results  # every rank stops, rank 1 included


def test_unreachable_rendezvous_fails_within_the_bound_naming_the_endpoint(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key in ("TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PIKV_RDZV_TIMEOUT_S", "3")
    for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    t0 = time.time()
    with pytest.raises(RendezvousError, match=f"could not rendezvous at 127.0.0.1:{port} "
                                              r"\(MASTER_ADDR:MASTER_PORT\) within 3 s"):
        init_distributed("cpu", "gloo")
    assert time.time() - t0 < 3 + 10  # the bound, plus slack for a busy machine


@pytest.mark.parametrize("raw", ["0", "-5", "soon"])
def test_bad_rendezvous_timeout_is_named(monkeypatch, raw):
    monkeypatch.setenv("PIKV_RDZV_TIMEOUT_S", raw)
    with pytest.raises(ValueError, match=f"PIKV_RDZV_TIMEOUT_S = '{raw}': expected a positive number of seconds"):
        rendezvous_timeout_s()
