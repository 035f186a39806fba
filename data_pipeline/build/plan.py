"""The build plan: where every input row goes (split, order, shard), computed in bounded memory.

The order of a build is the order of a seeded hash of the file each row names (`order_hash`), ties (the same file
named twice) in input order. The file is named relative to the input's folder where it lies inside it, so the same
tree (or manifest beside its images) built from another mount point or bucket gives the same shards in the same
order. The split of a row is a hash of its key, as always. A split's rows in that order, cut
into runs of `max_samples_per_shard`, are its shards: shard n holds what it can of ranks [n*M, (n+1)*M). Nothing
about the order depends on the number of processes or machines, so `--num-parts N --part K` takes whole shards of
one plan and the union of the parts is the one-machine build.

Two passes over the input, each streaming it:
1. The census (`take_census`) counts rows per split and per bucket of the order hash (its top 20 bits), collects
   the class table and a digest of every row. It holds the two count arrays (16 MB) and the class table.
2. `planned_rows` keeps only the rows of the buckets that hold the part's shards (and every other row in them: a
   duplicate of a kept row, in either split, has the same hash), spills them to local files in groups of buckets,
   then reads one group at a time back, sorted. Memory: one group, GROUP_ROWS rows or 1/MAX_GROUPS of the kept rows
   if that is more (a file named millions of times is one bucket, and so one group, however large). A part of a
   large build spills its slice only; a one-machine build spills the whole input once (a few hundred bytes per row,
   more with many metadata columns, under $TMPDIR).

The class table is made in the first pass, so the labels of rows that the second pass finds to be duplicates count
in it too (a label only a duplicate carries is a class with no sample).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import shutil
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from data_pipeline.build.sources import ClassTable, InputError, LabelCensus, Row
from data_pipeline.commands import UserError

SPLITS = ("train", "val")
BUCKET_BITS = 20
BUCKETS = 1 << BUCKET_BITS
GROUP_ROWS = 200_000
"""Rows read back into memory at once while planning (a few hundred bytes each)."""
MAX_GROUPS = 512
"""Spill files open at once (the usual limit of open files is 1,024); larger inputs make larger groups."""
COUNT_FLUSH_ROWS = 1 << 20
"""Bucket numbers kept in an array before they are added to the counts at once (numpy per row is slow)."""

PLANNING_FAILURES = frozenset({"missing_path", "missing_label", "bad_file_name", "duplicate", "unknown_label"})
"""Reasons a row fails before anything is read: reading it again (--retry-failed) cannot change them."""


@dataclass(frozen=True)
class PlanInput:
    """The input as the plan sees it, and the options that order and split it."""

    url: str
    rows: Callable[[], Iterator[Row | None]]
    """A fresh stream of the input's rows (None for an ignored file), the same on every call."""
    seed: int
    val_fraction: float
    folder: str
    """Where the input's relative names start: the image-folder tree itself, or a manifest's folder (an identity)."""


def split_of(key: str, val_fraction: float) -> str:
    """A fixed function of the key: the split of a sample never changes between runs or seeds."""
    unit = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if unit < val_fraction else "train"


def order_hash(seed: int, identity: str) -> int:
    """A row's place in the build order: a 64-bit hash of the file it names under the seed."""
    data = f"{seed}\0{identity}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _order_identity(row: Row, position: int, folder: str) -> str:
    # a row that names no file is a duplicate of nothing: its own identity, from its unique input position
    if row.identity is None:
        return f"\0row {position}"
    # Relative to the input's folder: the order was once the order of absolute paths, so the same digits built
    # under two temporary folders gave two orders (and a fine-tune test 0.30 top-1 in one, 0.42 in the other).
    inside = row.identity.removeprefix(folder.rstrip("/") + "/")
    return inside if inside != row.identity else row.identity


def _digest_line(row: Row) -> bytes:
    """What of a row decides the shards: the parts of a build compare their digests of every row."""
    line = f"{row.key}\0{row.source}\0{row.identity}\0{row.labels!r}\0{sorted(row.metadata.items())!r}\0{row.failure}"
    return (line + "\n").encode("utf-8", "surrogateescape")


@dataclass
class Census:
    """What the first pass learns about the whole input."""

    input_rows: int
    ignored_files: int
    counts: np.ndarray
    """Rows per split (SPLITS order) and order-hash bucket: shape (2, BUCKETS)."""
    classes: dict[str, int]
    classes_given: bool
    labelled: bool
    multi_label: bool
    digest: str
    """Of every row's key, source, labels and failure, in input order."""

    def split_rows(self, split: str) -> int:
        return int(self.counts[SPLITS.index(split)].sum())

    def num_shards(self, split: str, per_shard: int) -> int:
        return shard_count(self.split_rows(split), per_shard)

    def summary(self) -> dict[str, Any]:
        """What the final files need from the census (a part records it for the finalize step)."""
        return {
            "input_rows": self.input_rows,
            "ignored_files": self.ignored_files,
            "split_rows": {split: self.split_rows(split) for split in SPLITS},
            "classes": self.classes,
            "labelled": self.labelled,
            "multi_label": self.multi_label,
        }


def take_census(source: PlanInput, labelled: bool, given_classes: dict[str, int] | None) -> Census:
    counts = np.zeros((len(SPLITS), BUCKETS), dtype=np.int64)
    pending = [array("q") for _ in SPLITS]
    labels = LabelCensus()
    digest = hashlib.sha256()
    input_rows = ignored = 0
    multi_label = False
    for row in source.rows():
        if row is None:
            ignored += 1
            continue
        split = SPLITS.index(split_of(row.key, source.val_fraction))
        pending[split].append(
            order_hash(source.seed, _order_identity(row, input_rows, source.folder)) >> (64 - BUCKET_BITS)
        )
        if len(pending[split]) >= COUNT_FLUSH_ROWS:
            counts[split] += np.bincount(pending[split], minlength=BUCKETS)
            pending[split] = array("q")
        digest.update(_digest_line(row))
        if row.labels is not None and row.failure is None:
            labels.add(row.labels)
            multi_label = multi_label or len(row.labels) > 1
        input_rows += 1
    for split, buckets in enumerate(pending):
        counts[split] += np.bincount(buckets, minlength=BUCKETS)
    if not labelled:
        classes = {}
    elif given_classes is not None:
        classes = given_classes
    else:
        classes = labels.table()
    return Census(
        input_rows=input_rows,
        ignored_files=ignored,
        counts=counts,
        classes=classes,
        classes_given=given_classes is not None,
        labelled=labelled,
        multi_label=multi_label,
        digest=digest.hexdigest(),
    )


def shard_count(rows: int, per_shard: int) -> int:
    return math.ceil(rows / per_shard)


def part_shards(shards: int, num_parts: int, part: int) -> range:
    """The numbers of a split's `shards` shards that part `part` of `num_parts` builds: a contiguous run."""
    return range(shards * part // num_parts, shards * (part + 1) // num_parts)


def part_ranks(census: Census, per_shard: int, num_parts: int, part: int) -> dict[str, range]:
    """The ranks in each split that part `part` of `num_parts` builds: whole shards, a contiguous run of them."""
    ranks = {}
    for split in SPLITS:
        shards = part_shards(census.num_shards(split, per_shard), num_parts, part)
        ranks[split] = range(shards.start * per_shard, min(shards.stop * per_shard, census.split_rows(split)))
    return ranks


@dataclass
class PlannedRow:
    position: int
    """Place in the whole build order (both splits); errors.jsonl is in this order."""
    split: str
    rank: int
    """Place in its split's order: the row belongs to shard rank // max_samples_per_shard."""
    row: Row


class SpillError(UserError):
    """The plan's spill files cannot be written (a full or read-only $TMPDIR): one line, exit 2."""


def planned_rows(source: PlanInput, census: Census, ranks: dict[str, range], spill_dir: str) -> Iterator[PlannedRow]:
    """The rows with ranks in `ranks`, in build order, duplicates and unknown labels marked as failures. The kept
    rows are spilled into `spill_dir` (a local folder of this process alone: emptied first, removed after)."""
    starts = np.zeros((len(SPLITS), BUCKETS + 1), dtype=np.int64)
    np.cumsum(census.counts, axis=1, out=starts[:, 1:])  # rank of each bucket's first row, per split
    position_starts = starts.sum(axis=0)
    kept = np.zeros(BUCKETS, dtype=bool)
    for index, split in enumerate(SPLITS):
        wanted = ranks[split]
        if len(wanted):
            first = np.searchsorted(starts[index], wanted.start, side="right") - 1
            last = np.searchsorted(starts[index], wanted.stop, side="left") - 1
            kept[first : last + 1] = True
    groups = _bucket_groups(census.counts.sum(axis=0), kept)
    table = ClassTable(census.classes, census.classes_given)
    shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed run left
    try:
        try:
            os.makedirs(spill_dir)
            spilled, digest = _spill(source, groups, spill_dir)
        except OSError as error:
            raise SpillError(
                f"{spill_dir}: cannot write the plan's spill files ({error.strerror or error}); set TMPDIR to a local "
                "disk with room for a few hundred bytes per input row"
            ) from None
        if digest != census.digest:
            raise InputError(f"{source.url}: changed while it was being read; run again once it stays the same")
        for group in range(spilled):
            entries = _read_group(os.path.join(spill_dir, f"{group}.pickle"))
            yield from _ordered(entries, starts, position_starts, ranks, table)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _bucket_groups(rows_per_bucket: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The spill group of every bucket: consecutive kept buckets of about GROUP_ROWS rows together; -1 if not
    kept. A bucket is never cut, so all copies of one file land in one group."""
    kept_rows = np.where(kept, rows_per_bucket, 0)
    per_group = max(GROUP_ROWS, math.ceil(int(kept_rows.sum()) / MAX_GROUPS))
    before = np.cumsum(kept_rows) - kept_rows
    groups = before // per_group
    # consecutive group numbers for the groups that hold rows (a bucket larger than a group skips numbers)
    _, dense = np.unique(groups[kept], return_inverse=True)
    result = np.full(BUCKETS, -1, dtype=np.int64)
    result[kept] = dense
    return result


def _spill(source: PlanInput, groups: np.ndarray, folder: str) -> tuple[int, str]:
    """Write the kept rows into one local file per group (pickled tuples, read back by this process only); returns
    the number of groups and the digest of all rows, as the census takes it."""
    digest = hashlib.sha256()
    count = int(groups.max()) + 1
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(os.path.join(folder, f"{n}.pickle"), "wb")) for n in range(count)]
        position = 0
        for row in source.rows():
            if row is None:
                continue
            digest.update(_digest_line(row))
            identity = _order_identity(row, position, source.folder)
            hashed = order_hash(source.seed, identity)
            group = groups[hashed >> (64 - BUCKET_BITS)]
            if group >= 0:
                split = SPLITS.index(split_of(row.key, source.val_fraction))
                entry = (hashed, identity, position, split, row.key, row.source, row.labels, row.metadata, row.failure)
                pickle.dump(entry, files[group], protocol=pickle.HIGHEST_PROTOCOL)
            position += 1
    return count, digest.hexdigest()


def _read_group(path: str) -> list[tuple]:
    entries = []
    with open(path, "rb") as handle:
        while True:
            try:
                entries.append(pickle.load(handle))
            except EOFError:
                return entries


def _ordered(
    entries: list[tuple],
    starts: np.ndarray,
    position_starts: np.ndarray,
    ranks: dict[str, range],
    table: ClassTable,
) -> Iterator[PlannedRow]:
    entries.sort(key=itemgetter(0, 1, 2))  # hash, file, input position
    bucket, in_bucket, in_split = -1, 0, [0] * len(SPLITS)
    previous = None
    for hashed, identity, _, split, key, source, labels, metadata, failure in entries:
        row = Row(key, source, labels, metadata, failure, None if identity.startswith("\0") else identity)
        if hashed >> (64 - BUCKET_BITS) != bucket:
            bucket, in_bucket, in_split = hashed >> (64 - BUCKET_BITS), 0, [0] * len(SPLITS)
        position = int(position_starts[bucket]) + in_bucket
        rank = int(starts[split, bucket]) + in_split[split]
        in_bucket += 1
        in_split[split] += 1
        if (hashed, identity) == previous:
            row.failure = "duplicate"  # the first occurrence in the input is the sample
        previous = (hashed, identity)
        if rank not in ranks[SPLITS[split]]:
            continue
        if row.failure is None and row.labels is not None:
            indices = table.indices(row.labels)
            if indices is None:
                row.failure = "unknown_label"
            else:
                row.label_indices = indices
        yield PlannedRow(position, SPLITS[split], rank, row)
