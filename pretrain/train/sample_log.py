"""Which samples each optimizer step trained on (`logging.sample_keys`): `samples/` in the run folder.

Every rank appends one line per micro-batch it takes from the loader: the step the micro-batch counts toward, its
keys, each key's epoch and whether it was trained on (a micro-batch whose loss is not finite is skipped). Each start
of the trainer, fresh or resumed, writes its own folder `from-step-NNNNNNNN`, named after the step it starts from, so
the files of a run on 2 ranks and of its resume on 1 never mix; `read_sample_log` puts the timeline back together:
a step belongs to the last start at or before it. What it is for: the images behind a loss spike, and the proof that
a run resumed on another number of ranks sees the rest of its epoch exactly once (tests/test_trainer.py,
tests/test_trainer_job_shape.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any

import torch.distributed as dist

SAMPLES_DIR = "samples"
START_NAME = re.compile(r"from-step-(\d{8})")


def start_folder(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, SAMPLES_DIR, f"from-step-{step:08d}")


def starts(run_dir: str) -> list[int]:
    """The steps the run's starts began at, ascending."""
    folder = os.path.join(run_dir, SAMPLES_DIR)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(match[1]) for name in names if (match := START_NAME.fullmatch(name)))


class SampleLog:
    """This rank's file of the current start; nothing is written unless `enabled`."""

    def __init__(self, run_dir: str, first_step: int, rank: int, enabled: bool):
        self.handle = None
        if not enabled:
            return
        if rank == 0:
            # a start at step S abandons what earlier starts logged after S: their folders from S on go
            for step in starts(run_dir):
                if step >= first_step:
                    shutil.rmtree(start_folder(run_dir, step))
        if dist.is_initialized():
            dist.barrier()  # no file of an abandoned start is left
        folder = start_folder(run_dir, first_step)
        os.makedirs(folder, exist_ok=True)  # on every rank: a run folder may be each node's own
        path = os.path.join(folder, f"rank-{rank:05d}.jsonl")
        # line-buffered: a killed rank leaves whole lines (and at most one cut short, which the reader passes over)
        self.handle = open(path, "w", buffering=1)  # noqa: SIM115 - open for the whole run, closed by close()
        self.rank = rank

    def write(self, step: int, batch: dict[str, Any], trained: bool) -> None:
        if self.handle is None:
            return
        valid = batch["valid"].tolist()
        keys = [key for key, ok in zip(batch["key"], valid, strict=True) if ok]
        epochs = [epoch for epoch, ok in zip(batch["epoch"].tolist(), valid, strict=True) if ok]
        record = {"step": step, "rank": self.rank, "trained": trained, "keys": keys, "epochs": epochs}
        self.handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def remove_sample_log(run_dir: str) -> None:
    """An overwritten run's samples go with it."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(os.path.join(run_dir, SAMPLES_DIR))


def read_sample_log(run_dir: str) -> list[dict[str, Any]]:
    """The run's micro-batches as trained, in step order (by rank within a step): each step from the last start that
    began before it, whatever the number of ranks of each start."""
    first_steps = starts(run_dir)
    records: list[dict[str, Any]] = []
    for i, first in enumerate(first_steps):
        following = first_steps[i + 1] if i + 1 < len(first_steps) else None
        folder = start_folder(run_dir, first)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as handle:
                lines = handle.read().splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):
                        break  # the last line of a rank that was killed while writing it
                    raise
                if following is None or record["step"] <= following:
                    records.append(record)
    return sorted(records, key=lambda record: (record["step"], record["rank"]))
