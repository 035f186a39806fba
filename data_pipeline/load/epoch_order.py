"""Which samples each worker reads, in which order, and how far it got: the loader's determinism and resume.

An epoch is one fixed sequence of samples that depends only on (seed, epoch, shard list): the shards in a seeded
permutation, each shard's samples in a seeded shuffle of its own (a shuffle buffer over the tar stream). The
sequence is cut into as many contiguous, equal-length parts as there are workers in the whole job (ranks x data
workers), at sample granularity, so every worker gets the same number of samples (plus or minus one) whatever the
shard sizes. A part is a list of pieces, (epoch, shard, start, end): positions [start, end) of that shard's sequence.
A shard cut between two workers is read by both; the second skips the first one's samples without decoding them.

A worker's progress is a `Cursor`: the pieces it has open (with the position of the next undelivered sample), the
pieces queued behind them, and the first epoch whose part it has not planned yet. Cursors are taken at batch
boundaries, so they describe what the training loop consumed, not what was prefetched.

- Same job shape on resume: each worker continues from its own cursor and yields exactly the batches it would have.
- Another job shape: the cursors of all old workers say what is left of each epoch (`remaining`); that is re-cut
  into parts for the new workers (`reshard`). Nothing is skipped or repeated, and only the open pieces' shards are
  read again (up to their positions), never the epoch from its start.
"""

from __future__ import annotations

import dataclasses
import functools
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

    def part(self, epoch: int, worker: int, num_workers: int) -> list[Piece]:
        return list(self.parts(epoch, num_workers)[worker])

    @functools.lru_cache(maxsize=4)  # noqa: B019 (plans are few, small and live as long as their loader)
    def parts(self, epoch: int, num_workers: int) -> tuple[tuple[Piece, ...], ...]:
        """The epoch cut for all workers at once: sizing a finite run or resharding asks for every worker's part,
        and cutting once per epoch keeps that linear in the number of shards."""
        return tuple(tuple(part) for part in split(self.pieces(epoch), num_workers))

    def sample_rng(self, epoch: int, shard: int) -> np.random.Generator:
        """The generator of one shard's sample shuffle in one epoch."""
        return np.random.default_rng([self.seed, epoch, shard, 1])


def split(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """Cut a sequence of pieces into `parts` contiguous parts whose sizes differ by at most one sample."""
    total = sum(piece.size for piece in pieces)
    bounds = [total * i // parts for i in range(parts + 1)]
    result: list[list[Piece]] = [[] for _ in range(parts)]
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


@dataclass
class Cursor:
    """How far one worker got: open pieces (start = next undelivered position), queued pieces, next fresh epoch."""

    slots: list[Piece | None]
    queue: list[Piece] = field(default_factory=list)
    next_epoch: int = 0
    """The first epoch whose part is neither open nor queued; later parts come from the order."""
    turn: int = 0
    """The slot the next sample is taken from (slots take turns)."""
    batches: int = 0
    """Batches this worker has delivered."""

    def to_json(self) -> dict[str, Any]:
        return {
            "slots": [list(piece) if piece else None for piece in self.slots],
            "queue": [list(piece) for piece in self.queue],
            "next_epoch": self.next_epoch,
            "turn": self.turn,
            "batches": self.batches,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cursor:
        return cls(
            slots=[Piece(*piece) if piece else None for piece in data["slots"]],
            queue=[Piece(*piece) for piece in data["queue"]],
            next_epoch=data["next_epoch"],
            turn=data["turn"],
            batches=data["batches"],
        )

    def copy(self) -> Cursor:
        return dataclasses.replace(self, slots=list(self.slots), queue=list(self.queue))

    def pending(self) -> list[Piece]:
        return [piece for piece in self.slots if piece is not None] + self.queue


def remaining(order: EpochOrder, cursors: list[Cursor], horizon: int) -> dict[int, list[Piece]]:
    """What is left of every epoch before `horizon`, given the cursors of all workers of a job, in sequence order."""
    left: dict[int, list[Piece]] = {}
    for worker, cursor in enumerate(cursors):
        for piece in cursor.pending():
            left.setdefault(piece.epoch, []).append(piece)
        for epoch in range(cursor.next_epoch, horizon):
            left.setdefault(epoch, []).extend(order.part(epoch, worker, len(cursors)))
    for epoch, pieces in left.items():
        position = {shard: i for i, shard in enumerate(order.shard_order(epoch))}
        pieces.sort(key=lambda piece: (position[piece.shard], piece.start))
    return left


def reshard(order: EpochOrder, cursors: list[Cursor], num_workers: int, slots: int) -> list[Cursor]:
    """New cursors for `num_workers` workers that deliver exactly what the old workers had left."""
    horizon = max(cursor.next_epoch for cursor in cursors)
    left = remaining(order, cursors, horizon)
    fresh = [Cursor(slots=[None] * slots, next_epoch=horizon) for _ in range(num_workers)]
    for epoch in sorted(left):
        for cursor, part in zip(fresh, split(left[epoch], num_workers), strict=True):
            cursor.queue.extend(part)
    return fresh


def shuffled(items: Iterable[T], rng: np.random.Generator, buffer_size: int) -> Iterator[T]:
    """A seeded shuffle through a buffer of `buffer_size` items; the whole stream when it fits in the buffer."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(buffer_size))
        yield buffer[slot]
        buffer[slot] = item
    order = rng.permutation(len(buffer))
    for slot in order:
        yield buffer[int(slot)]
