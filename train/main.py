"""PiKV training entry point.

  python train/main.py [--config configs/X.yaml] [key.sub=value ...]
  torchrun --nproc_per_node 8 train/main.py --config configs/X.yaml key.sub=value ...
"""

import argparse
import os
import sys

# One intra-op thread per process unless the user says otherwise: N processes on N cores must
# not oversubscribe, and forking after a multithreaded matmul can hang. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pikv.data import DataError  # noqa: E402
from pikv.distributed import destroy_distributed, init_distributed, report_error  # noqa: E402
from pikv.distributed.shared_fs import RunDirNotSharedError, check_shared_run_dir  # noqa: E402
from pikv.tasks import load_job  # noqa: E402
from pikv.training import Trainer  # noqa: E402
from pikv.training.trainer import NonFiniteLossError  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with the values that differ from the defaults")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = load_job(args.config, args.overrides)  # every check, before any work
    except ValueError as err:
        report_error(str(err))  # under torchrun: one line, not one per rank
        return 2
    ctx = init_distributed(cfg.train.device, cfg.parallel.backend, cfg.parallel.expert_parallel_size)
    try:
        check_shared_run_dir(os.path.join(cfg.train.output_dir, cfg.train.run_name), ctx)
        result = Trainer(cfg, ctx).fit()
        if ctx.is_main:
            print(f"run directory: {result.run_dir}\nlast checkpoint: {result.last_checkpoint}")
            if result.preempted:  # exit 0: launch/slurm/train.sbatch requeues on runs/<name>/preempted.json
                print("stopped by a signal after a checkpoint; run again (train.resume=auto) to continue")
    except (NonFiniteLossError, RunDirNotSharedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except DataError as err:  # raised on every rank (pikv.data.prepare_data); reported once
        report_error(str(err))
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
