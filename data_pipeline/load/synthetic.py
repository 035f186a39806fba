"""An in-memory stand-in for the streaming loader: one random batch, served forever.

It measures what the trainer does without any input pipeline (model throughput, memory), so that the cost of
streaming real data can be stated as a ratio. Select it with `data.train = "synthetic"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from data_pipeline.load.shardlist import ShardList

SOURCE = "synthetic"
SAMPLES_PER_EPOCH = 1_281_167  # ImageNet-1k's training set, so that "epoch" in logs reads as usual


class SyntheticLoader:
    def __init__(self, *, batch_size: int, image_size: int, num_classes: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.batch = {
            "image": torch.randint(
                0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator
            ),
            "label": torch.randint(0, max(num_classes, 1), (batch_size,), generator=generator),
            "key": [f"synthetic-{i}" for i in range(batch_size)],
            "epoch": torch.zeros(batch_size, dtype=torch.int64),
            "valid": torch.ones(batch_size, dtype=torch.bool),
        }
        self.shards = ShardList(
            urls=[], num_samples=[SAMPLES_PER_EPOCH], labelled=True, num_classes=num_classes, multi_label=False
        )
        self.samples_per_epoch = SAMPLES_PER_EPOCH

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch

    def state_dict(self) -> dict[str, Any]:
        return {"format": SOURCE}

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore: every batch is the same."""

    def counters(self) -> dict[str, Any]:
        return {
            "samples": 0,
            "padding": 0,
            "bytes": 0,
            "retries": 0,
            "skipped": {},
            "samples_per_s": 0.0,
            "bytes_per_s": 0.0,
        }
