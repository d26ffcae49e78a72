"""Read back an offline W&B run (the .wandb file: a LevelDB-style log of protobuf Records).

wandb >= 0.17 no longer ships a Python reader, so this reads the format directly: 32 KiB
blocks of records with a 7-byte header (crc32, length, type: full/first/middle/last). Used on
resume (which steps did a killed process really hand to W&B?) and by the tests.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    pos, pending, records = HEADER, b"", []  # the file opens with a 7-byte ident
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 or len(chunk) < length:  # end of log, or a record cut short by a kill
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(run_dir: Path, run_id: str = "*") -> list[dict]:
    """Every history row logged to the offline runs (of run_id) under run_dir/wandb, in file order."""
    rows = []
    for path in sorted(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def last_step(run_dir: Path, run_id: str) -> int:
    """The highest history step the offline runs of run_id under run_dir hold (0 if none)."""
    return max((int(row.get("_step", 0)) for row in history(run_dir, run_id)), default=0)


def run_ids(run_dir: Path) -> set[str]:
    ids = set()
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
    return ids
