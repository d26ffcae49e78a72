"""Prepare a corpus for training: token shards read by memory map (docs/data.md).

  python train/prepare_data.py --source SRC --out DIR [--tokenizer T] [--num-proc N]
  python train/main.py data.source=DIR ...

Same as `python -m pikv.data.prepare`; --help lists every option.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pikv.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
