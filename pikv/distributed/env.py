"""Launch environment -> process group, device, and the data x expert parallel groups.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK), under SLURM's one-task-per-process launch
(SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID when torchrun's variables are absent), and with plain
`python train/main.py`, where a world of one is created on a free loopback port so that every
code path (collectives, torch.distributed.checkpoint) is the same for 1 and N processes.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep_size: int
    # Ranks holding the same experts form an expert-data-parallel group: expert gradients are
    # averaged over it only. Ranks that together hold all experts form an expert-parallel group.
    ep_group: Optional[dist.ProcessGroup] = None
    expert_dp_group: Optional[dist.ProcessGroup] = None
    mesh: Optional[DeviceMesh] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        # Every rank reads its own data shard; expert parallelism splits experts, not data.
        return self.world_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else SLURM, else a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: the batch script itself also has
    # SLURM_PROCID=0 and SLURM_NTASKS=N, and a plain `python train/main.py` there is one process.
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_STEP_NUM_TASKS"])
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        if "MASTER_PORT" not in os.environ:
            # Every task must agree on the port without talking: derive it from the job id.
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        return rank, world, int(os.environ.get("SLURM_LOCALID", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return 0, 1, 0


def launch_world_size() -> int:
    """The number of processes this one was launched with (torchrun, SLURM, else 1), known before
    any process group: checks that fail alike on every rank run before the rendezvous, so no rank
    exits while another is still building groups through rank 0's store."""
    return _launch_env()[1]


# torchrun stops every worker as soon as one exits: a rank other than 0 that failed a check every
# rank fails alike waits up to this long, so rank 0 is not stopped before it printed the error line.
ERROR_GRACE_S = 10.0


def report_error(message: str) -> None:
    """One `error:` line for a failure every rank hits alike (a bad config, bad data): rank 0 prints
    it; the others print nothing and wait up to ERROR_GRACE_S (torchrun stops them when rank 0 exits).
    Without the wait, a loaded machine lets another rank exit first and torchrun stop rank 0 before
    it printed: the user saw no message at all (seen in CI under load)."""
    if _launch_env()[0] == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(ERROR_GRACE_S)


class RendezvousError(RuntimeError):
    """The rendezvous endpoint (MASTER_ADDR:MASTER_PORT) could not be reached in time."""


def rendezvous_timeout_s() -> float:
    """How long a process waits to reach the rendezvous endpoint: $PIKV_RDZV_TIMEOUT_S, else 300 s
    (as launch/slurm/train.sbatch gives torchrun). Bounded on purpose: an unreachable endpoint must fail the job, not
    hold its nodes for the 30 min of the collective timeout."""
    raw = os.environ.get("PIKV_RDZV_TIMEOUT_S", "300")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"PIKV_RDZV_TIMEOUT_S = {raw!r}: expected a positive number of seconds")
    return value


def _rendezvous_store(rank: int, world: int, rdzv_timeout: timedelta, timeout: timedelta) -> dist.Store:
    """The store every rank meets at, reached within rdzv_timeout; its later waits use timeout.

    Under torchrun it is the agent's store, its keys scoped to this restart attempt: torchrun (torch 2.x)
    gives every restart attempt the same store with no per-attempt prefix, so a restarted worker can read
    the address a dead peer of the previous attempt left there and time out in gloo's connectFullMesh.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    # The agent hosts the store unless torchrun was told not to share it; then rank 0 does.
    agent_hosts = attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(addr, port, world, is_master=not agent_hosts and rank == 0, timeout=rdzv_timeout,
                              multi_tenant=attempt is not None and not agent_hosts)
    except (RuntimeError, TimeoutError) as err:  # DistNetworkError / DistStoreError are RuntimeErrors
        raise RendezvousError(
            f"rank {rank} on {socket.gethostname()} could not rendezvous at {addr}:{port} (MASTER_ADDR:MASTER_PORT) "
            f"within {rdzv_timeout.total_seconds():.0f} s (PIKV_RDZV_TIMEOUT_S): is the address reachable from "
            f"this node and the port open? {err}") from err
    store.set_timeout(timeout)
    return store if attempt is None else dist.PrefixStore(f"pikv/attempt_{attempt}/", store)


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'train.device' = 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _build_mesh(ctx: DistContext) -> None:
    """A 2-D mesh (expert-DP x EP): EP groups are consecutive ranks (fast links within a node),
    expert-DP groups stride them. The mesh also gives DTensor placements for checkpoints."""
    ctx.mesh = init_device_mesh(ctx.device.type, (ctx.world_size // ctx.ep_size, ctx.ep_size),
                                mesh_dim_names=("edp", "ep"))
    ctx.ep_group = ctx.mesh.get_group("ep")
    ctx.expert_dp_group = ctx.mesh.get_group("edp")


def init_distributed(device: str = "auto", backend: str = "auto", ep_size: int = 1,
                     timeout_s: float = 1800.0) -> DistContext:
    """Initialise the default process group (always, even for one process) and the EP groups."""
    rank, world, local_rank = _launch_env()
    if world % ep_size:
        raise ValueError(
            f"config key 'parallel.expert_parallel_size' = {ep_size} must divide the world size {world}")
    torch_device = _pick_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = _rendezvous_store(rank, world, timedelta(seconds=rendezvous_timeout_s()), timeout)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout, store=store,
                                device_id=torch_device if torch_device.type == "cuda" else None)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=torch_device, ep_size=ep_size)
    _build_mesh(ctx)
    return ctx


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
