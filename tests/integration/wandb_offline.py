"""Read back an offline W&B run (the .wandb file: a LevelDB-style log of protobuf Records).

wandb >= 0.17 no longer ships a Python reader, so the test reads the format directly: 32 KiB
blocks of records with a 7-byte header (crc32, length, type: full/first/middle/last).
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
        if kind == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(run_dir: Path) -> list[dict]:
    """Every history row logged to the offline runs under run_dir/wandb, in file order."""
    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def run_ids(run_dir: Path) -> set[str]:
    ids = set()
    for path in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        for record in read_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
    return ids
