"""`make_loader`: WebDataset shards from any fsspec URL to augmented uint8 batches, deterministic and resumable.

The loader of one rank runs `num_workers` data workers (torch DataLoader processes; none with num_workers=0). The
whole job has ranks x workers workers; each reads its own contiguous part of every epoch (see `epoch_order`), so
every sample of an epoch is delivered exactly once across ranks. Training runs on across epochs without a break;
a finite run (`epochs=N`, the default for evaluation) pads its last batches, marked `valid=False`, so that every
rank gets the same number of batches and no collective waits for a rank that ran out.

`state_dict()` describes what the training loop has consumed on this rank. Save it per rank; on resume pass the
states of all old ranks (or just this rank's when the job shape is unchanged) to `load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.commands import UserError
from data_pipeline.load.augment import Augment
from data_pipeline.load.epoch_order import Cursor, EpochOrder, JobShape, planned_until, reshard, size
from data_pipeline.load.remote import RetryPolicy
from data_pipeline.load.shardlist import ShardList, SourceError, resolve
from data_pipeline.load.stream import StreamConfig, WorkerStream

# 2: epochs exact per rank (cursors know where their epoch begins); 3: shuffle buffers grow from SHUFFLE_START (a
# piece's positions name other samples than in 2)
STATE_FORMAT = "vit-pretrain-loader/3"


class LoaderStateError(UserError):
    """A saved loader state does not fit this loader; the message says what differs and what to do."""


class _Workers(IterableDataset):
    """The dataset each DataLoader worker iterates: it picks its logical worker and streams its batches."""

    def __init__(
        self,
        config: StreamConfig,
        cursors: list[Cursor],
        rank: int,
        first: int,
        shape: JobShape,
        target_batches: int | None,
    ):
        self.config, self.cursors, self.rank, self.first = config, cursors, rank, first
        self.shape, self.target_batches = shape, target_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # DataLoader hands out batches round-robin starting at process 0; after a resume the next batch is due from
        # logical worker `first`, so process i plays logical worker first + i.
        local = ((info.id if info else 0) + self.first) % len(self.cursors)
        worker = self.rank * len(self.cursors) + local
        stream = WorkerStream(self.config, self.cursors[local].copy(), worker, self.shape, self.target_batches)
        for batch in stream.batches():
            batch["_worker"] = local
            yield batch


class StreamingLoader:
    def __init__(
        self,
        shards: ShardList,
        config: StreamConfig,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        slots: int,
        prefetch_factor: int = 2,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards, self.config = shards, config
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers_per_rank = max(1, num_workers)
        self.shape = JobShape(world_size, self.workers_per_rank, config.batch_size)
        self.total_workers = self.shape.total_workers
        if shards.total < self.total_workers:
            raise SourceError(
                f"{shards.urls[0]}...: {shards.total} samples cannot feed {self.total_workers} data "
                f"workers ({world_size} ranks x {self.workers_per_rank}); use fewer workers"
            )
        self.slots = slots
        self.prefetch_factor = prefetch_factor
        self.cursors = [Cursor(slots=[None] * slots) for _ in range(self.workers_per_rank)]
        self.next_worker = 0
        self.target_batches = self._target(self._fresh_cursors())
        self.length = self._remaining_batches()
        self.worker_counters: dict[int, dict[str, Any]] = {}
        self.started: float | None = None

    # -- sizes ---------------------------------------------------------------------------------------------------

    def _remaining_batches(self) -> int:
        return sum((self.target_batches or 0) - cursor.batches for cursor in self.cursors)

    def _fresh_cursors(self) -> list[Cursor]:
        return [Cursor(slots=[None] * self.slots) for _ in range(self.total_workers)]

    def _target(self, cursors: list[Cursor]) -> int | None:
        """Batches per worker in a finite run: enough for the worker with the most samples left."""
        epochs = self.config.epochs
        if epochs is None:
            return None
        most = max(
            size(planned_until(self.config.order, self.shape, worker, cursor, epochs).pending())
            for worker, cursor in enumerate(cursors)
        )
        return math.ceil(most / self.config.batch_size)

    def __len__(self) -> int:
        """Batches this rank delivers in a finite run: from the start, or from the state it was resumed from."""
        if self.target_batches is None:
            raise TypeError("a training loader runs on across epochs and has no length; pass epochs=N for one")
        return self.length

    @property
    def samples_per_epoch(self) -> int:
        return self.shards.total

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _Workers(self.config, self.cursors, self.rank, self.next_worker, self.shape, self.target_batches)
        if self.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            # Its own generator: by default DataLoader draws its workers' base seed from torch's global generator,
            # so opening an evaluation or probe loader would change the training run's later random draws.
            batches = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                pin_memory=torch.accelerator.is_available(),
                generator=torch.Generator().manual_seed(self.config.order.seed),
            )
        self.started = self.started or time.monotonic()
        # The workers are forked here. Objects they inherit are kept out of their garbage collection: a destructor
        # run in a fork (a process group's, a thread pool's) can wait forever for threads the fork did not copy.
        gc.freeze()
        try:
            batches = iter(batches)
        finally:
            gc.unfreeze()
        for batch in batches:
            local = batch.pop("_worker")
            self.cursors[local] = Cursor.from_json(batch.pop("_cursor"))
            self.worker_counters[local] = batch.pop("_counters")
            self.next_worker = (local + 1) % self.workers_per_rank
            yield batch

    def counters(self) -> dict[str, Any]:
        """Totals of this rank's workers since the loader was made: samples, padding, skipped by reason, bytes,
        retries, and samples/s and bytes/s since the first batch was requested."""
        skipped: Counter[str] = Counter()
        totals = {"samples": 0, "padding": 0, "bytes": 0, "retries": 0}
        for counters in self.worker_counters.values():
            for name in totals:
                totals[name] += counters[name]
            skipped.update(counters["skipped"])
        elapsed = time.monotonic() - self.started if self.started else 0.0
        rates = {
            "samples_per_s": totals["samples"] / elapsed if elapsed else 0.0,
            "bytes_per_s": totals["bytes"] / elapsed if elapsed else 0.0,
        }
        return {**totals, "skipped": dict(skipped), **rates}

    # -- resume --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers_per_rank": self.workers_per_rank,
            "batch_size": self.config.batch_size,
            "seed": self.config.order.seed,
            "shuffle_buffer": self.config.shuffle_buffer,
            "shard_samples": list(self.shards.num_samples),
            "next_worker": self.next_worker,
            "target_batches": self.target_batches,
            "cursors": [cursor.to_json() for cursor in self.cursors],
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from saved state: this rank's own (same ranks and workers), or all old ranks' (any job shape)."""
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise LoaderStateError("no loader state given")
        for saved in states:
            self._check(saved)
        same_shape = [
            saved
            for saved in states
            if saved["rank"] == self.rank
            and saved["world_size"] == self.world_size
            and saved["workers_per_rank"] == self.workers_per_rank
            and saved["batch_size"] == self.config.batch_size
        ]
        if same_shape:
            saved = same_shape[0]
            self.cursors = [Cursor.from_json(cursor) for cursor in saved["cursors"]]
            self.next_worker = saved["next_worker"]
            self.target_batches = saved["target_batches"]
            self.length = self._remaining_batches()
            return
        shapes = {JobShape(saved["world_size"], saved["workers_per_rank"], saved["batch_size"]) for saved in states}
        if len(shapes) > 1:
            raise LoaderStateError("the loader states come from jobs of different shapes: pass one job's states")
        (old_shape,) = shapes
        by_rank = {saved["rank"]: saved for saved in states}
        if sorted(by_rank) != list(range(old_shape.world_size)):
            raise LoaderStateError(
                f"the saved loader ran on {old_shape.world_size} ranks x {old_shape.workers} workers with batches of "
                f"{old_shape.batch_size}, this one on {self.world_size} x {self.workers_per_rank} with batches of "
                f"{self.config.batch_size}: pass the states of all {old_shape.world_size} old ranks"
            )
        old = [Cursor.from_json(cursor) for rank in range(old_shape.world_size) for cursor in by_rank[rank]["cursors"]]
        new = reshard(self.config.order, old_shape, old, self.shape, self.slots)
        self.cursors = new[self.rank * self.workers_per_rank : (self.rank + 1) * self.workers_per_rank]
        self.next_worker = 0
        self.target_batches = self._target(new)
        self.length = self._remaining_batches()

    def _check(self, saved: dict[str, Any]) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise LoaderStateError(
                f"loader state format {saved.get('format')!r} is not {STATE_FORMAT!r}: it was saved by another "
                "release; resume with the release that saved it, or start afresh"
            )
        if saved["seed"] != self.config.order.seed:
            raise LoaderStateError(
                f"loader state has seed {saved['seed']}, this loader {self.config.order.seed}: "
                "resume with the seed of the run"
            )
        if saved.get("shuffle_buffer") != self.config.shuffle_buffer:
            # positions count samples of the shuffled order, which the buffer size decides
            raise LoaderStateError(
                f"loader state has shuffle_buffer {saved.get('shuffle_buffer')}, this loader "
                f"{self.config.shuffle_buffer}: resume with the shuffle_buffer of the run"
            )
        if saved["shard_samples"] != list(self.shards.num_samples):
            raise LoaderStateError(
                f"loader state was saved for another shard list ({len(saved['shard_samples'])} "
                f"shards, {sum(saved['shard_samples'])} samples; now {len(self.shards.urls)}, "
                f"{self.shards.total}): resume with the same data source"
            )


def make_loader(
    source: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    train: bool = True,
    image_size: int = 224,
    storage_options: dict[str, Any] | None = None,
    split: str = "train",
    epochs: int | None = None,
    labels: bool = True,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    open_shards: int = 4,
    shuffle_buffer: int = 256,
    retry: RetryPolicy | None = None,
    max_error_fraction: float = 0.01,
    prefetch_shards: int = 1,
    num_classes: int | None = None,
) -> StreamingLoader:
    """Batches {"image": uint8 N x 3 x H x W, "label", "key", "valid"} from `source`, an index.json URL written by
    build-shards or a brace pattern of shard URLs. Images are channels-last in memory (torch.channels_last).

    `batch_size` is per rank. `train` selects random-resized crops, flips and shuffling; otherwise a centre crop in
    stored order and, unless `epochs` says otherwise, one padded epoch. `open_shards` pieces of shards are read and
    interleaved at once per worker, each shuffled through `shuffle_buffer` samples (memory: about open_shards x
    shuffle_buffer encoded images per worker). `num_classes` (a classifier's outputs) bounds the labels of shards
    without a class table: a label outside it is skipped as bad_label, not handed to a loss that would index with it.
    """
    shards = resolve(source, split=split, storage_options=storage_options)
    if shards.num_classes is None and num_classes:
        shards = dataclasses.replace(shards, num_classes=num_classes)
    if labels and shards.multi_label and not shards.num_classes:
        raise SourceError(f"{source}: multi-label shards need the number of classes; build them with build-shards")
    config = StreamConfig(
        shards=shards,
        order=EpochOrder(tuple(shards.num_samples), seed, shuffle=train),
        augment=Augment(image_size, train, crop_scale, crop_ratio, hflip),
        batch_size=batch_size,
        labels=labels and shards.labelled,
        epochs=epochs if epochs is not None or train else 1,
        shuffle_buffer=shuffle_buffer,
        retry=retry or RetryPolicy(),
        storage_options=storage_options,
        max_error_fraction=max_error_fraction,
        prefetch_shards=prefetch_shards,
    )
    return StreamingLoader(shards, config, rank=rank, world_size=world_size, num_workers=num_workers, slots=open_shards)


__all__ = ["LoaderStateError", "SourceError", "StreamingLoader", "make_loader"]
