"""Which samples each worker reads, in which order, and how far it got: the loader's determinism and resume.

An epoch is one fixed sequence of samples that depends only on (seed, epoch, shard list): the shards in a seeded
permutation, each shard's samples in a seeded shuffle of its own (a shuffle buffer over the tar stream). The
sequence is cut into as many contiguous, equal-length shares as there are ranks (at sample granularity, so every
rank gets the same number of samples, plus or minus one, whatever the shard sizes), and each rank's share into one
contiguous part per data worker. A part is a list of pieces, (epoch, shard, start, end): positions [start, end) of
that shard's sequence. A shard cut between two workers is read by both; the second skips the first one's samples
without decoding them.

Epochs are exact on every rank: a rank delivers all of its share of epoch e before any sample of epoch e+1. A
rank's workers hand over whole batches in turn (worker 0's first batch, worker 1's, ..., worker 0's second), so the
rank's stream is theirs interleaved batch by batch; each worker's part of an epoch is sized to the positions of the
rank's stream that fall to it while that epoch is delivered (`JobShape.worker_parts`), and a worker opens no piece
of the next epoch while one of the current epoch is open (stream.py). Skipped samples are the exception: a worker
fills a bad sample's place in its batch with its next sample, so each skip moves its later samples one place
earlier, and the shift adds up over the run (a corrupt image is skipped in every epoch). Every sample is still
delivered once per epoch; only the boundary blurs, by the number of samples the rank's workers have skipped.

A worker's progress is a `Cursor`: the pieces it has open (with the position of the next undelivered sample), the
pieces queued behind them, the first epoch whose part it has not planned yet and where in the rank's stream that
epoch begins. Cursors are taken at batch boundaries, so they describe what the training loop consumed, not what was
prefetched.

- Same job shape on resume: each worker continues from its own cursor and yields exactly the batches it would have.
- Another job shape (ranks, workers per rank or batch size): the cursors of all old workers say what is left of each
  epoch (`remaining`); that is re-cut into shares and parts for the new workers (`reshard`). Nothing is skipped or
  repeated, epochs stay exact, and only the open pieces' shards are read again (up to their positions), never the
  epoch from its start.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")


class Piece(NamedTuple):
    epoch: int
    shard: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class EpochOrder:
    """The epoch sequences of one shard list: shard order and the cut into parts."""

    num_samples: tuple[int, ...]
    """Samples per shard, in the shard list's order."""
    seed: int
    shuffle: bool

    def shard_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.num_samples)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.num_samples))]

    def pieces(self, epoch: int) -> list[Piece]:
        """The whole epoch as one piece per shard, in sequence order."""
        return [
            Piece(epoch, shard, 0, self.num_samples[shard])
            for shard in self.shard_order(epoch)
            if self.num_samples[shard] > 0
        ]

    def rank_share(self, epoch: int, rank: int, world_size: int) -> list[Piece]:
        return list(self.shares(epoch, world_size)[rank])

    @functools.lru_cache(maxsize=4)  # noqa: B019 (plans are few, small and live as long as their loader)
    def shares(self, epoch: int, world_size: int) -> tuple[tuple[Piece, ...], ...]:
        """The epoch cut for all ranks at once: every worker of a rank asks for its rank's share, and cutting once
        per epoch keeps that linear in the number of shards."""
        return tuple(tuple(share) for share in split(self.pieces(epoch), world_size))

    def sample_rng(self, epoch: int, shard: int) -> np.random.Generator:
        """The generator of one shard's sample shuffle in one epoch."""
        return np.random.default_rng([self.seed, epoch, shard, 1])


def size(pieces: Iterable[Piece]) -> int:
    return sum(piece.size for piece in pieces)


def split(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """Cut a sequence of pieces into `parts` contiguous parts whose sizes differ by at most one sample."""
    total = size(pieces)
    return cut(pieces, [total * (i + 1) // parts - total * i // parts for i in range(parts)])


def cut(pieces: list[Piece], sizes: list[int]) -> list[list[Piece]]:
    """Cut a sequence of pieces into contiguous parts of the given sizes (which add up to the sequence's)."""
    bounds = list(itertools.accumulate(sizes, initial=0))
    result: list[list[Piece]] = [[] for _ in sizes]
    offset = 0  # position of the current piece's first sample in the whole sequence
    part = 0
    for piece in pieces:
        cursor = offset
        piece_end = offset + piece.size
        while cursor < piece_end:
            while bounds[part + 1] <= cursor:
                part += 1
            stop = min(piece_end, bounds[part + 1])
            start = piece.start + cursor - offset
            result[part].append(Piece(piece.epoch, piece.shard, start, start + stop - cursor))
            cursor = stop
        offset = piece_end
    return result


@dataclass(frozen=True)
class JobShape:
    """How a job reads: `world_size` ranks, each with `workers` data workers that hand over batches of `batch_size`
    in turn. Worker w of the job is worker w % workers of rank w // workers."""

    world_size: int
    workers: int
    batch_size: int

    @property
    def total_workers(self) -> int:
        return self.world_size * self.workers

    def delivered_by(self, slot: int, position: int) -> int:
        """How many of the first `position` samples of a rank's stream come from its worker `slot` (the stream starts
        with worker 0's first batch)."""
        turn = self.workers * self.batch_size
        rounds, rest = divmod(position, turn)
        return rounds * self.batch_size + min(max(rest - slot * self.batch_size, 0), self.batch_size)

    def worker_parts(self, pieces: list[Piece], start: int) -> list[list[Piece]]:
        """A rank's pieces of one epoch cut into its workers' parts, when the epoch begins at position `start` of the
        rank's stream: each worker gets as many as the stream takes from it until the epoch is delivered."""
        end = start + size(pieces)
        return cut(pieces, [self.delivered_by(s, end) - self.delivered_by(s, start) for s in range(self.workers)])


@dataclass
class Cursor:
    """How far one worker got: open pieces (start = next undelivered position), queued pieces, next fresh epoch."""

    slots: list[Piece | None]
    queue: list[Piece] = field(default_factory=list)
    next_epoch: int = 0
    """The first epoch whose part is neither open nor queued; later parts come from the order."""
    stream_start: int = 0
    """Where `next_epoch` begins in the stream of the worker's rank (counted from the job's start or resharding)."""
    turn: int = 0
    """The slot the next sample is taken from (slots take turns)."""
    batches: int = 0
    """Batches this worker has delivered."""
    read_from: list[tuple[int, int] | None] = field(default_factory=list)
    """Per slot, where a resumed read of its open piece continues the shard: (the place of the first sample not read,
    its byte offset); None (or missing) to read the shard from its start. The samples before that place are
    stand-ins that keep the shuffle's count, except those listed in `held`."""
    held: list[list[tuple[int, int, int]]] = field(default_factory=list)
    """Per slot, the samples before `read_from` that the shuffle still held, (place, byte offset, end): a resume
    fetches each by its byte range instead of reading the shard's prefix again. A state of the release before
    (none listed) named the oldest held sample in `read_from`, so the prefix from there is read, which is also
    exact."""

    def to_json(self) -> dict[str, Any]:
        return {
            "slots": [list(piece) if piece else None for piece in self.slots],
            "queue": [list(piece) for piece in self.queue],
            "next_epoch": self.next_epoch,
            "stream_start": self.stream_start,
            "turn": self.turn,
            "batches": self.batches,
            "read_from": [list(start) if start else None for start in self.read_from],
            "held": [[list(sample) for sample in held] for held in self.held],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cursor:
        return cls(
            slots=[Piece(*piece) if piece else None for piece in data["slots"]],
            queue=[Piece(*piece) for piece in data["queue"]],
            next_epoch=data["next_epoch"],
            stream_start=data["stream_start"],
            turn=data["turn"],
            batches=data["batches"],
            read_from=[tuple(start) if start else None for start in data.get("read_from", [])],
            held=[[tuple(sample) for sample in held] for held in data.get("held", [])],
        )

    def copy(self) -> Cursor:
        return dataclasses.replace(
            self, slots=list(self.slots), queue=list(self.queue), read_from=list(self.read_from), held=list(self.held)
        )

    def pending(self) -> list[Piece]:
        return [piece for piece in self.slots if piece is not None] + self.queue


def plan_epoch(order: EpochOrder, shape: JobShape, worker: int, cursor: Cursor) -> None:
    """Queue the worker's part of the first epoch it has not planned."""
    rank, slot = divmod(worker, shape.workers)
    share = order.rank_share(cursor.next_epoch, rank, shape.world_size)
    cursor.queue.extend(shape.worker_parts(share, cursor.stream_start)[slot])
    cursor.stream_start += size(share)
    cursor.next_epoch += 1


def planned_until(order: EpochOrder, shape: JobShape, worker: int, cursor: Cursor, horizon: int) -> Cursor:
    """A copy of the cursor with every epoch before `horizon` planned: all the worker has left of them."""
    cursor = cursor.copy()
    while cursor.next_epoch < horizon:
        plan_epoch(order, shape, worker, cursor)
    return cursor


def remaining(order: EpochOrder, shape: JobShape, cursors: list[Cursor], horizon: int) -> dict[int, list[Piece]]:
    """What is left of every epoch before `horizon`, given the cursors of all workers of a job, in sequence order."""
    left: dict[int, list[Piece]] = {}
    for worker, cursor in enumerate(cursors):
        for piece in planned_until(order, shape, worker, cursor, horizon).pending():
            left.setdefault(piece.epoch, []).append(piece)
    for epoch, pieces in left.items():
        position = {shard: i for i, shard in enumerate(order.shard_order(epoch))}
        pieces.sort(key=lambda piece: (position[piece.shard], piece.start))
    return left


def reshard(order: EpochOrder, old: JobShape, cursors: list[Cursor], new: JobShape, slots: int) -> list[Cursor]:
    """Cursors for the workers of a job of shape `new` that deliver exactly what the old job's workers had left,
    each epoch before the next on every rank."""
    horizon = max(cursor.next_epoch for cursor in cursors)
    left = remaining(order, old, cursors, horizon)
    fresh = [Cursor(slots=[None] * slots, next_epoch=horizon) for _ in range(new.total_workers)]
    starts = [0] * new.world_size  # where the next epoch begins in each new rank's stream
    for epoch in sorted(left):
        for rank, share in enumerate(split(left[epoch], new.world_size)):
            for slot, part in enumerate(new.worker_parts(share, starts[rank])):
                fresh[rank * new.workers + slot].queue.extend(part)
            starts[rank] += size(share)
    for worker, cursor in enumerate(fresh):
        cursor.stream_start = starts[worker // new.workers]
    return fresh


SHUFFLE_START = 32
"""Items a shuffle buffer holds before it gives its first one. A worker opens four shards at once; with buffers that
filled to 256 first, it read 4 x 256 samples (84 MB of 683x512 JPEGs) before its first batch of 64, 1.2 of the 1.8 s
to that batch from S3. Starting at 32 and growing, it reads about 4 x 64."""


class Shuffled(Iterator[T]):
    """A seeded shuffle through a buffer that gives its first item once it holds SHUFFLE_START, then grows by one for
    every two items read until it holds `buffer_size`; the whole stream when it fits in the buffer.

    The random draws depend only on how many items were read, never on what they are: a resume can feed stand-ins for
    the items it knows were given before its position, and for those `held()` lists handles to fetch them by, and get
    the same sequence after it.
    """

    def __init__(self, items: Iterable[T], rng: np.random.Generator, buffer_size: int):
        self.items, self.rng, self.buffer_size = iter(items), rng, buffer_size
        self.buffer: list[tuple[int, T]] = []  # (place in the input, item)
        self.read = self.given = 0
        self.draining: list[int] | None = None  # at the end of the input: the order the rest leaves in

    def __next__(self) -> T:
        while self.draining is None:
            item = next(self.items, _END)
            if item is _END:
                self.draining = [int(slot) for slot in self.rng.permutation(len(self.buffer))][::-1]
                break
            self.buffer.append((self.read, item))  # type: ignore[arg-type]
            self.read += 1
            if len(self.buffer) < min(self.buffer_size, SHUFFLE_START + self.given):
                continue
            slot = int(self.rng.integers(len(self.buffer)))
            self.buffer[slot], self.buffer[-1] = self.buffer[-1], self.buffer[slot]
            self.given += 1
            return self.buffer.pop()[1]
        if not self.draining:
            raise StopIteration
        return self.buffer[self.draining.pop()][1]

    def held(self) -> list[tuple[int, T]]:
        """The items read and not yet given, with their places in the input, in the order they were read."""
        held = self.buffer if self.draining is None else [self.buffer[slot] for slot in self.draining]
        return sorted(held, key=lambda entry: entry[0])


def draw_order(rng: np.random.Generator, buffer_size: int, count: int) -> Iterator[int]:
    """The places of an input of `count` items in the order a `Shuffled` with this generator gives them."""
    return Shuffled(range(count), rng, buffer_size)


_END: Any = object()
