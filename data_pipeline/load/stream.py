"""One data worker: read its pieces of shards, interleave their samples, decode them into batches with cursors.

The worker keeps a few pieces open at once (`Cursor.slots`) and takes one sample from each in turn, so a batch mixes
several shards; the shard after the current ones is already being fetched. Every batch carries the worker's cursor
after its last sample and the worker's counters, which is how the main process knows what was consumed.

Bad data never stops the stream: a corrupt image, a missing or out-of-range label, a truncated or missing shard is
skipped and counted by reason, with at most one warning per reason every few seconds. Only when the skipped share
(of the samples seen, and at least of one epoch's share of the worker) passes `max_error_fraction` does the worker
raise `LoaderError`, naming the shard and the reason.
"""

from __future__ import annotations

import itertools
import logging
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from PIL import Image

from data_pipeline.format.sample import SkippedSample, multi_labels, single_label
from data_pipeline.format.tar_reader import tar_members
from data_pipeline.load.augment import Augment, decode
from data_pipeline.load.epoch_order import Cursor, EpochOrder, JobShape, Piece, Shuffled, plan_epoch
from data_pipeline.load.remote import PrefetchedShard, ReadCounters, RetryingReader, RetryPolicy, ShardReadError
from data_pipeline.load.shardlist import ShardList
from data_pipeline.storage import filesystem

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WARNING_INTERVAL = 10.0


class LoaderError(Exception):
    """Too much bad data: the message names the shard, the reason and the limit."""


@dataclass(frozen=True)
class StreamConfig:
    shards: ShardList
    order: EpochOrder
    augment: Augment
    batch_size: int
    labels: bool
    """Deliver labels; False for objectives that need none (labels in the shards are then ignored)."""
    epochs: int | None
    """Stop after this many epochs, padding the end so every worker delivers the same number of batches; None runs
    on across epochs without a break."""
    shuffle_buffer: int
    retry: RetryPolicy
    storage_options: dict[str, Any] | None
    max_error_fraction: float
    prefetch_shards: int = 1


@dataclass
class WorkerCounters:
    samples: int = 0
    """Samples delivered (not counting padding)."""
    padding: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "padding": self.padding,
            "skipped": dict(self.skipped),
            "bytes": self.bytes,
            "retries": self.retries,
        }


SAMPLE_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""A member's name as key and extensions: everything after the first dot of the base name (WebDataset's rule)."""


def tar_samples(stream: PrefetchedShard, url: str, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one tar stream (beginning at byte `offset` of the tar) in stored order, as {"__key__",
    "__url__", "__offset__": where its first member begins (None in a compressed tar), extension: bytes}: consecutive
    members with one key form a sample, as WebDataset groups them."""
    sample: dict[str, Any] | None = None
    for member in tar_members(stream, offset):
        name = SAMPLE_NAME.match(member["fname"])
        if name is None:
            continue
        key, extension = name.group(1), name.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url, "__offset__": member.get("offset")}
        if extension in sample:
            raise ValueError(f"{member['fname']}: a second member with this name")
        sample[extension] = member["data"]
    if sample is not None:
        yield sample


class OpenPiece:
    def __init__(
        self,
        piece: Piece,
        stream: PrefetchedShard,
        samples: Iterator[dict[str, Any]],
        shuffle: Shuffled[dict[str, Any] | None] | None,
    ):
        self.piece, self.stream, self.samples, self.shuffle = piece, stream, samples, shuffle
        self.pos = piece.start

    def read_from(self) -> tuple[int, int] | None:
        """Where a resumed read of this piece may begin: the oldest sample its shuffle still holds (place in the
        shard, byte offset); None when unknown (no shuffle, nothing held, a compressed tar)."""
        oldest = self.shuffle.oldest() if self.shuffle else None
        if oldest is None or oldest[1] is None or oldest[1]["__offset__"] is None:
            return None
        return oldest[0], oldest[1]["__offset__"]

    def close(self) -> None:
        self.stream.close()


class WorkerStream:
    def __init__(self, config: StreamConfig, cursor: Cursor, worker: int, shape: JobShape, target_batches: int | None):
        self.config = config
        self.cursor = cursor
        self.worker, self.shape = worker, shape
        self.target_batches = target_batches
        self.counters = WorkerCounters()
        self.read_counters = ReadCounters()
        self.filesystems: dict[str, tuple[fsspec.AbstractFileSystem, str]] = {}
        self.prefetched: dict[Piece, PrefetchedShard] = {}
        self.open: list[OpenPiece | None] = [None] * len(cursor.slots)
        self.last_warning: dict[str, float] = {}
        self.seen = 0

    # -- reading -------------------------------------------------------------------------------------------------

    def _stream(self, url: str, offset: int = 0) -> PrefetchedShard:
        # One filesystem object per protocol and worker process, made here (after fork) rather than shared
        protocol = fsspec.utils.get_protocol(url)
        if protocol not in self.filesystems:
            options = {**(self.config.storage_options or {}), "skip_instance_cache": True}
            self.filesystems[protocol] = filesystem(url, options)  # it gives options only to object stores
        fs = self.filesystems[protocol][0]
        path = fs._strip_protocol(url)
        return PrefetchedShard(RetryingReader(fs, path, url, self.config.retry, self.read_counters, offset))

    def _start(self, piece: Piece, read_from: tuple[int, int] | None = None) -> OpenPiece:
        """Open a piece; with `read_from` (a resumed piece's oldest held sample: place, byte offset), the shard is read
        from that sample on, and the samples before it, all delivered before the piece's start, are stand-ins that
        only keep the shuffle's count."""
        url = self.config.shards.urls[piece.shard]
        place, offset = read_from if read_from and self.config.order.shuffle and read_from[0] <= piece.start else (0, 0)
        stream = (self.prefetched.pop(piece, None) if not offset else None) or self._stream(url, offset)
        samples: Iterator[dict[str, Any] | None] = tar_samples(stream, url, offset)
        shuffle = None
        if self.config.order.shuffle:
            samples = shuffle = Shuffled(
                itertools.chain(itertools.repeat(None, place), samples),
                self.config.order.sample_rng(piece.epoch, piece.shard),
                self.config.shuffle_buffer,
            )
        # The piece's first samples belong to another worker or were delivered before a resume: skip, undecoded
        return OpenPiece(piece, stream, itertools.islice(samples, piece.start, None), shuffle)  # type: ignore[arg-type]

    def _next_piece(self) -> Piece | None:
        """The piece to open next (planning the next epoch's part when the queue is empty), left in the queue."""
        cursor = self.cursor
        while not cursor.queue:
            if self.config.epochs is not None and cursor.next_epoch >= self.config.epochs:
                return None
            plan_epoch(self.config.order, self.shape, self.worker, cursor)
        return cursor.queue[0]

    def _open_epoch(self) -> int | None:
        """The epoch of the open pieces (all of one epoch); None when none is open."""
        return min((piece.epoch for piece in self.cursor.slots if piece is not None), default=None)

    def _prefetch(self) -> None:
        for piece in self.cursor.queue[: self.config.prefetch_shards]:
            if piece not in self.prefetched:
                self.prefetched[piece] = self._stream(self.config.shards.urls[piece.shard])

    def _next_raw(self) -> tuple[Piece, dict[str, Any]] | None:
        """The next sample in turn from the open pieces (refilling them), or None when all work is done."""
        cursor = self.cursor
        slots = len(self.open)
        idle = 0
        while idle < slots:
            i = cursor.turn
            if self.open[i] is None:
                piece = cursor.slots[i] or self._next_piece()
                if piece is None:
                    cursor.turn = (i + 1) % slots
                    idle += 1
                    continue
                current_epoch = self._open_epoch()
                if current_epoch is not None and piece.epoch > current_epoch:
                    # the next epoch waits until this one is delivered; its first shards are fetched meanwhile
                    self._prefetch()
                    cursor.turn = (i + 1) % slots
                    continue
                if cursor.slots[i] is None:
                    cursor.queue.pop(0)
                self.open[i] = self._start(piece)
                cursor.slots[i] = piece
                self._prefetch()
            current = self.open[i]
            assert current is not None
            raw = self._read(current)
            if raw is None:
                self._close_slot(i)
                continue
            current.pos += 1
            piece = current.piece
            if current.pos == piece.end:
                if piece.end == self.config.shards.num_samples[piece.shard]:
                    self._count_unlisted(current)
                self._close_slot(i)
            else:
                cursor.slots[i] = piece._replace(start=current.pos)
            cursor.turn = (i + 1) % slots
            return piece, raw
        return None

    def _close_slot(self, i: int) -> None:
        self.open[i].close()  # type: ignore[union-attr]
        self.open[i] = None
        self.cursor.slots[i] = None

    def _read(self, current: OpenPiece) -> dict[str, Any] | None:
        """The piece's next raw sample (an open piece always has one left, by the index); None when the shard ends
        early or fails, counted as skipped."""
        url = self.config.shards.urls[current.piece.shard]
        try:
            raw = next(current.samples)
            if raw is None:  # a stand-in past the resume position: the saved state does not fit this shard
                raise ValueError("the saved loader state does not fit this shard (a skipped sample came after it)")
            return raw
        except StopIteration:
            reason, detail = "short_shard", "fewer samples than the index lists"
        except FileNotFoundError:
            reason, detail = "missing_shard", "not found"
        except ShardReadError as error:
            reason, detail = "unreadable_shard", str(error)
        except (tarfile.TarError, EOFError, ValueError, OSError) as error:
            reason, detail = "truncated_shard", f"{type(error).__name__}: {error}"
        lost = current.piece.end - current.pos
        self.seen += lost
        self._skip(reason, url, f"{detail}; {lost} samples skipped", count=lost)
        return None

    def _count_unlisted(self, current: OpenPiece) -> None:
        """A shard holding more samples than its index lists: the index decides what an epoch is, so the extra ones
        are not delivered; they are counted as skipped rather than lost silently. In a shard that matches its index
        this reads only the end-of-archive blocks."""
        try:
            extra = sum(1 for _ in current.samples)
        except (ShardReadError, tarfile.TarError, EOFError, ValueError, OSError):
            return  # damage past the listed samples: everything the index promised was delivered
        if extra:
            url = self.config.shards.urls[current.piece.shard]
            detail = f"{extra} more samples than the index lists; rebuild the index (build-shards) to read them"
            self._skip("long_shard", url, detail, count=extra)

    # -- decoding ------------------------------------------------------------------------------------------------

    def _label(self, raw: dict[str, Any]) -> torch.Tensor:
        shards = self.config.shards
        if not self.config.labels:
            return torch.tensor(-1)
        if shards.multi_label:
            target = torch.zeros(shards.num_classes or 0)
            target[multi_labels(raw, len(target))] = 1.0
            return target
        return torch.tensor(single_label(raw, shards.num_classes))

    def _decode(self, piece: Piece, raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            raise SkippedSample("missing_image", f"members {sorted(k for k in raw if not k.startswith('__'))}")
        label = self._label(raw)
        rng = self.config.augment.rng(self.config.order.seed, piece.epoch, raw["__key__"])
        try:
            image = decode(data, self.config.augment, rng)
        except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as error:
            raise SkippedSample("corrupt_image", f"{type(error).__name__}: {error}") from None
        return image, label

    def _skip(self, reason: str, url: str, detail: str, count: int = 1) -> None:
        self.counters.skipped[reason] += count
        skipped = sum(self.counters.skipped.values())
        # Measured against at least one epoch's share of this worker, so a bad shard early in a run is no worse than
        # the same shard late in the epoch
        share = max(self.seen, self.config.shards.total / self.shape.total_workers)
        if skipped > self.config.max_error_fraction * share:
            raise LoaderError(
                f"{url}: {reason} ({detail}); {skipped} of {self.seen} samples skipped, more than "
                f"max_error_fraction={self.config.max_error_fraction}; fix or drop the bad shards"
            )
        now = time.monotonic()
        if now - self.last_warning.get(reason, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self.last_warning[reason] = now
            log.warning(
                "%s: skipped %s: %s (%d so far for this reason)", url, reason, detail, self.counters.skipped[reason]
            )

    # -- batches -------------------------------------------------------------------------------------------------

    def _empty_label(self) -> torch.Tensor:
        if self.config.labels and self.config.shards.multi_label:
            return torch.zeros(self.config.shards.num_classes or 0)
        return torch.tensor(-1)

    def batches(self) -> Iterator[dict[str, Any]]:
        try:
            read_from = self.cursor.read_from + [None] * (len(self.cursor.slots) - len(self.cursor.read_from))
            for i, piece in enumerate(self.cursor.slots):
                if piece is not None:
                    self.open[i] = self._start(piece, read_from[i])
            while self.target_batches is None or self.cursor.batches < self.target_batches:
                batch = self._batch()
                if batch is None:
                    return
                yield batch
        finally:
            for current in self.open:
                if current is not None:
                    current.close()
            for stream in self.prefetched.values():
                stream.close()

    def _batch(self) -> dict[str, Any] | None:
        size = self.config.augment.image_size
        # N x 3 x H x W, channels-last in memory like the decoded crops: copying a crop in is then a plain copy, not
        # a transpose (0.01 instead of 0.1 ms per image), and convolutional stems on GPUs prefer this layout
        images = torch.zeros(self.config.batch_size, size, size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
        labels: list[torch.Tensor] = []
        keys: list[str] = []
        epochs: list[int] = []
        while len(keys) < self.config.batch_size:
            item = self._next_raw()
            if item is None:
                break
            piece, raw = item
            self.seen += 1
            try:
                image, label = self._decode(piece, raw)
            except SkippedSample as skipped:
                self._skip(skipped.reason, self.config.shards.urls[piece.shard], f"{raw['__key__']}: {skipped}")
                continue
            images[len(keys)] = image
            labels.append(label)
            keys.append(raw["__key__"])
            epochs.append(piece.epoch)
        if not keys and self.target_batches is None:
            return None
        real = len(keys)
        padding = self.config.batch_size - real
        # Only a finite run pads: so that every worker (and so every rank) delivers the same number of batches
        labels.extend(self._empty_label() for _ in range(padding))
        keys.extend("" for _ in range(padding))
        epochs.extend(-1 for _ in range(padding))
        self.counters.samples += real
        self.counters.padding += padding
        self.counters.bytes, self.counters.retries = self.read_counters.bytes, self.read_counters.retries
        self.cursor.batches += 1
        self.cursor.read_from = [current.read_from() if current else None for current in self.open]
        return {
            "image": images,
            "label": torch.stack(labels),
            "key": keys,
            "epoch": torch.tensor(epochs),
            "valid": torch.arange(self.config.batch_size) < real,
            "_cursor": self.cursor.to_json(),
            "_counters": self.counters.to_json(),
        }
