"""Helpers for distributed tests: fork-based gloo workers (OLMo-core's run_distributed_test).

Fork starts a worker in well under a second (spawn re-imports torch: 20-30 s per test). Forking
is only safe when the parent has not run multithreaded kernels, so tests set OMP_NUM_THREADS=1
before torch is imported (tests/conftest.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
            queue: "mp.Queue") -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        # Plain pickle to bytes: torch's multiprocessing reductions would pass tensors through
        # shared memory owned by this process, which is gone once it exits.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report every failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    timeout_s: float = 300.0) -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` forked processes; return results by rank.

    Raises RuntimeError with the worker's traceback if any rank fails or times out.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
