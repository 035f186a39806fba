"""What an offline W&B run wrote, read back from its run file without W&B's servers.

W&B keeps no reader of its run files in Python any more (the Go core reads them when `wandb sync` uploads). The
format is LevelDB's log: a 7-byte header (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks of chunks, each
a 4-byte checksum, a 2-byte length, a 1-byte type (full, first, middle, last) and the bytes of a protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """The protobuf records of a `run-<id>.wandb` file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    found, pending, offset = [], b"", HEADER
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + CHUNK_HEADER])
        if kind == 0:  # zeros: the file ends here (space written ahead, never filled)
            break
        chunk = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
    return found


def history(path: Path) -> dict[tuple[str, int], float]:
    """Every logged value of the run file as {(key, step): value}."""
    values = {}
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = record.history.step.num if record.history.HasField("step") else int(items["_step"])
        values.update({(key, step): value for key, value in items.items() if not key.startswith("_")})
    return values


def config(path: Path) -> dict[str, Any]:
    """The run's config (the last value of each key written)."""
    values = {}
    for record in records(path):
        if record.WhichOneof("record_type") in ("run", "config"):
            updates = record.run.config.update if record.HasField("run") else record.config.update
            values.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates})
    return values
