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

import io
import itertools
import logging
import re
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
import torch
from PIL import Image

from data_pipeline.format.sample import SkippedSample, multi_labels, single_label
from data_pipeline.format.tar_reader import tar_members
from data_pipeline.load.augment import Augment, decode
from data_pipeline.load.epoch_order import Cursor, EpochOrder, JobShape, Piece, Shuffled, draw_order, plan_epoch
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


def tar_samples(stream: BinaryIO, url: str, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one tar stream (beginning at byte `offset` of the tar) in stored order, as {"__key__",
    "__url__", "__offset__": where its first member begins, "__end__": where its last ends (both None in a
    compressed tar), extension: bytes}: consecutive members with one key form a sample, as WebDataset groups them."""
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
        sample["__end__"] = member.get("end")
    if sample is not None:
        yield sample


HELD_FETCHES = 16
"""Samples a resumed worker fetches at once by their byte ranges: with 20 ms before every response, 64 ranges took
0.32 s with 16 in flight here, against 1.64 s one at a time."""
FETCH_AHEAD = 64
"""Held samples fetched (or being fetched) ahead of the worker. Fetching all of them at once (about 1,000 per worker
at half an epoch in the peer benchmark) spent the two cores on requests while the first batches were decoded."""


@dataclass
class HeldSample:
    """A sample a resumed shuffle held when its state was saved, fetched by its byte range instead of reading the
    shard's prefix again."""

    url: str
    offset: int
    end: int
    fetched: Future[dict[str, Any]] | None = None
    """Set while it is fetched or waits to be taken; dropped once taken (the sample's bytes go with it)."""
    taken: bool = False


Resumable = tuple[tuple[int, int] | None, list[tuple[int, int, int]] | None]
"""Where a resumed read of a piece continues the shard, and the samples before it still held: `Cursor.read_from` and
`Cursor.held` of one slot (held None in a state of the release before, whose read_from names the oldest held)."""


class OpenPiece:
    def __init__(self, piece: Piece, stream: PrefetchedShard, resumed: Resumable):
        self.piece, self.stream = piece, stream
        self.pos = piece.start
        self.resumed = resumed
        """What the piece was opened with: its resume point until its shuffle has read anything."""
        self.next_read: tuple[int, int] | None = resumed[0]
        """The place and byte offset of the shard's first sample not read; None in a compressed tar."""
        self.samples: Iterator[dict[str, Any] | HeldSample | None] = iter(())
        self.shuffle: Shuffled[dict[str, Any] | HeldSample | None] | None = None
        self.to_fetch: list[HeldSample] = []
        """A resumed piece's held samples, in the order its shuffle gives them."""

    def counted(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The shard's samples as read, keeping `next_read` at the first one not read."""
        for sample in samples:
            if self.next_read is not None:
                self.next_read = (self.next_read[0] + 1, sample["__end__"]) if sample["__end__"] is not None else None
            yield sample

    def resumable(self) -> Resumable:
        """Where a resumed read continues, and the held samples to fetch; (None, []) to read the shard from its start
        (a compressed tar, whose samples have no offsets)."""
        if self.shuffle is not None and not self.shuffle.read:
            return self.resumed
        held = []
        for place, sample in self.shuffle.held() if self.shuffle else []:
            span = (sample.offset, sample.end) if isinstance(sample, HeldSample) else None
            if isinstance(sample, dict) and sample["__offset__"] is not None:
                span = (sample["__offset__"], sample["__end__"])
            if span is None:
                return None, []
            held.append((place, *span))
        return (self.next_read, held) if self.next_read is not None else (None, [])

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
        self.fetcher: ThreadPoolExecutor | None = None
        self.to_fetch: deque[HeldSample] = deque()
        self.fetching = 0
        """Held samples fetched or being fetched that the worker has not taken yet."""
        self.last_warning: dict[str, float] = {}
        self.seen = 0

    # -- reading -------------------------------------------------------------------------------------------------

    def _reader(self, url: str, offset: int = 0) -> RetryingReader:
        # One filesystem object per protocol and worker process, made here (after fork) rather than shared
        protocol = fsspec.utils.get_protocol(url)
        if protocol not in self.filesystems:
            options = {**(self.config.storage_options or {}), "skip_instance_cache": True}
            self.filesystems[protocol] = filesystem(url, options)  # it gives options only to object stores
        fs = self.filesystems[protocol][0]
        return RetryingReader(fs, fs._strip_protocol(url), url, self.config.retry, self.read_counters, offset)

    def _stream(self, url: str, offset: int = 0) -> PrefetchedShard:
        return PrefetchedShard(self._reader(url, offset))

    def _start(self, piece: Piece, resumed: Resumable | None = None) -> OpenPiece:
        """Open a piece; a resumed one (`resumed`: where the saved state's read of it continues, and the samples it
        held) reads the shard on from there. The samples before that place were all given before the piece's start,
        except the held ones, fetched by their byte ranges (`_fetch_held`); the rest are stand-ins that only keep the
        shuffle's count."""
        url = self.config.shards.urls[piece.shard]
        if resumed is None or resumed[0] is None or not self._fits(piece, *resumed):
            resumed = ((0, 0), [])
        (place, offset), saved = resumed
        listed = [(p, start, end) for p, start, end in saved or ()]  # a state read from JSON holds lists
        held = {p: HeldSample(url, start, end) for p, start, end in listed}
        stream = (self.prefetched.pop(piece, None) if not offset else None) or self._stream(url, offset)
        current = OpenPiece(piece, stream, ((place, offset), listed))
        before = (held.get(earlier) for earlier in range(place))
        samples: Iterator[Any] = itertools.chain(before, current.counted(tar_samples(stream, url, offset)))
        if self.config.order.shuffle:
            samples = current.shuffle = Shuffled(
                samples, self.config.order.sample_rng(piece.epoch, piece.shard), self.config.shuffle_buffer
            )
        # The piece's first samples belong to another worker or were delivered before a resume: skip, undecoded
        current.samples = itertools.islice(samples, piece.start, None)
        current.to_fetch = [held[p] for p in self._in_draw_order(piece, set(held))]
        return current

    def _fits(self, piece: Piece, read_from: tuple[int, int], held: list[tuple[int, int, int]] | None) -> bool:
        """Whether a saved read position agrees with the piece: every sample read was given or is held. A state of
        the release before (`held` None) named the oldest held sample, from which every later one is read again."""
        if held is None:
            return self.config.order.shuffle and read_from[0] <= piece.start
        return read_from[0] - len(held) == piece.start and (self.config.order.shuffle or not held)

    def _in_draw_order(self, piece: Piece, places: set[int]) -> list[int]:
        """The places of the held samples this piece will give, in the order it gives them: the order to fetch them
        in. Those the shuffle gives after the piece's end are another worker's, and stay in the shuffle unfetched."""
        if not places:
            return []
        order: list[int] = []
        draws = draw_order(
            self.config.order.sample_rng(piece.epoch, piece.shard),
            self.config.shuffle_buffer,
            self.config.shards.num_samples[piece.shard],
        )
        for place in itertools.islice(draws, piece.start, piece.end):
            if place in places:
                order.append(place)
                if len(order) == len(places):
                    break
        return order  # any other is fetched when given (a shard that does not match its index)

    def _fetch_held(self, opened: list[OpenPiece]) -> None:
        """Fetch the held samples of the resumed pieces by their byte ranges in the order the worker will take them
        (its slots take turns), HELD_FETCHES at once and at most FETCH_AHEAD ahead of the worker."""
        self.to_fetch = deque(
            sample
            for turn in itertools.zip_longest(*(current.to_fetch for current in opened))
            for sample in turn
            if sample is not None
        )
        if self.to_fetch:
            self.fetcher = ThreadPoolExecutor(HELD_FETCHES, thread_name_prefix="held samples")
            self._fetch_ahead()

    def _fetch_ahead(self) -> None:
        while self.to_fetch and self.fetching < FETCH_AHEAD:
            sample = self.to_fetch.popleft()
            if sample.fetched is None and not sample.taken:  # else given before its turn, or its piece closed
                self._fetch(sample)

    def _fetch(self, sample: HeldSample) -> None:
        assert self.fetcher is not None
        reader = self._reader(sample.url, sample.offset)
        sample.fetched = self.fetcher.submit(self._fetched, reader, sample.url, sample.end)
        self.fetching += 1

    def _held(self, sample: HeldSample) -> dict[str, Any]:
        """A held sample the shuffle gives, once fetched."""
        if sample.fetched is None:
            self._fetch(sample)
        fetched, sample.fetched, sample.taken = sample.fetched, None, True
        try:
            return fetched.result()  # type: ignore[union-attr]
        finally:
            self.fetching -= 1
            self._fetch_ahead()

    @staticmethod
    def _fetched(reader: RetryingReader, url: str, end: int) -> dict[str, Any]:
        offset = reader.offset
        sample = next(tar_samples(io.BytesIO(reader.read_range(end)), url, offset), None)  # type: ignore[arg-type]
        if sample is None:
            raise ValueError(f"no sample at byte {offset}: the saved loader state does not fit this shard")
        return sample

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
        for sample in self.open[i].to_fetch:  # type: ignore[union-attr]
            if sample.fetched is not None:  # fetched for a piece that ended early (a short or damaged shard)
                sample.fetched.cancel()
                self.fetching -= 1
            sample.fetched, sample.taken = None, True
        self.open[i].close()  # type: ignore[union-attr]
        self.open[i] = None
        self.cursor.slots[i] = None

    def _read(self, current: OpenPiece) -> dict[str, Any] | None:
        """The piece's next raw sample (an open piece always has one left, by the index); None when the shard ends
        early or fails, counted as skipped."""
        url = self.config.shards.urls[current.piece.shard]
        try:
            raw = next(current.samples)
            if isinstance(raw, HeldSample):
                raw = self._held(raw)
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
            cursor = self.cursor
            read_from = cursor.read_from + [None] * (len(cursor.slots) - len(cursor.read_from))
            # a state of the release before lists no held samples: None tells `_fits` how to read its read_from
            held = cursor.held or [None] * len(cursor.slots)
            for i, piece in enumerate(cursor.slots):
                if piece is not None:
                    self.open[i] = self._start(piece, (read_from[i], held[i]))
            self._fetch_held([current for current in self.open if current is not None])
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
            if self.fetcher is not None:
                self.fetcher.shutdown(wait=False, cancel_futures=True)

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
        resumable = [current.resumable() if current else (None, []) for current in self.open]
        self.cursor.read_from = [read_from for read_from, _ in resumable]
        self.cursor.held = [held for _, held in resumable]
        return {
            "image": images,
            "label": torch.stack(labels),
            "key": keys,
            "epoch": torch.tensor(epochs),
            "valid": torch.arange(self.config.batch_size) < real,
            "_cursor": self.cursor.to_json(),
            "_counters": self.counters.to_json(),
        }
