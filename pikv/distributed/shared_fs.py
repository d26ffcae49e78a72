"""Every rank must see the same run directory, or a multi-node job fails late and confusingly.

Checkpoints are written by all ranks into one directory (torch.distributed.checkpoint: one shard per
rank) and read back by all of them; metrics and W&B are written by rank 0 only. If train.output_dir is
a node-local path (/tmp, a relative path under a different working directory, an unmounted share),
each node writes its own half of every checkpoint and a resume cannot find a complete one. So before
any work, rank 0 writes a file with a random token into the run directory and every rank reads it.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import torch.distributed as dist

from pikv.distributed.env import DistContext


class RunDirNotSharedError(RuntimeError):
    """Some ranks do not see the run directory rank 0 sees."""


def check_shared_run_dir(run_dir: Path | str, ctx: DistContext) -> None:
    """Raise RunDirNotSharedError on every rank unless all ranks see rank 0's file in run_dir."""
    if ctx.world_size == 1:
        return
    run_dir = Path(run_dir)
    token = [uuid.uuid4().hex if ctx.is_main else None]
    dist.broadcast_object_list(token, src=0)
    probe = run_dir / f".pikv-shared-check-{token[0]}"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    ctx.barrier()  # the file exists (for ranks that share the directory) before anyone looks
    try:
        sees = probe.is_file() and probe.read_text() == token[0]
    except OSError:
        sees = False
    views: list = [None] * ctx.world_size
    dist.all_gather_object(views, (sees, socket.gethostname(), str(run_dir.resolve())))
    ctx.barrier()  # everyone has looked before the file goes
    if ctx.is_main:
        probe.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host} ({path})" for rank, (ok, host, path) in enumerate(views) if not ok]
    if ctx.is_main and not blind:
        by_host: dict[str, list[int]] = {}
        for rank, (_, host, _) in enumerate(views):
            by_host.setdefault(host, []).append(rank)
        hosts = ", ".join(f"{host} (ranks {', '.join(map(str, ranks))})" for host, ranks in by_host.items())
        print(f"run directory {views[0][2]} is shared by all {ctx.world_size} ranks on {hosts}", flush=True)
    if blind:
        raise RunDirNotSharedError(
            f"the run directory is not shared by all ranks: rank 0 on {views[0][1]} wrote a file into "
            f"{views[0][2]}, which {', '.join(blind)} cannot see. All ranks read and write checkpoints there: "
            f"set train.output_dir to a path on a file system every node mounts (an absolute path).")
