"""Build WebDataset shards from a corpus: plan, resume, encode in parallel, write shards in order, index.

The plan (plan.py) puts every input row at a rank of its split, in an order fixed by the inputs and the seed;
shard n of a split holds what it can of ranks [n*M, (n+1)*M) for M = max_samples_per_shard. Worker processes
encode images and lay each sample out as tar blocks; results come back in plan order and this process appends them
to the open shard of their split. A background thread commits finished shards, each followed by its record under
`_build/`; a re-run skips the shards those records account for.

A build can be cut into parts (`num_parts`, `part`): each part builds a contiguous run of every split's shards and
records itself in `_build/part-K-of-N.json`; `finalize` checks the parts agree and writes the final files. A
one-machine build is part 0 of 1 followed by its finalize step.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from data_pipeline.build.images import ImageOptions
from data_pipeline.build.plan import (
    PLANNING_FAILURES,
    SPLITS,
    Census,
    PlanInput,
    PlannedRow,
    part_ranks,
    part_shards,
    planned_rows,
    shard_count,
    take_census,
)
from data_pipeline.build.sources import (
    MANIFEST_SUFFIXES,
    Row,
    identity,
    load_classes,
    read_image_folder,
    read_manifest,
)
from data_pipeline.build.worker import EncodeJob, Outcome, encoding_here, init_worker, process_chunk
from data_pipeline.commands import UserError
from data_pipeline.format.index import (
    BUILD_DIR,
    SampleFailure,
    ShardIndex,
    ShardInfo,
    ShardRecord,
    SplitTotals,
)
from data_pipeline.format.tar_writer import ShardWriter
from data_pipeline.storage import (
    commit_file,
    filesystem,
    is_local,
    is_remote_url,
    join,
    remove_stale_temporaries,
    write_bytes_atomic,
)

CHUNK = 16
"""Rows per message to a worker process."""
CHUNKS_IN_FLIGHT_PER_WORKER = 4
"""Bounds the encoded samples held in memory when the shard writer falls behind."""


class OutputError(UserError):
    """The output cannot be written or holds another build: a one-line message, exit 2."""


class BuildStopped(Exception):
    """The build stopped part-way (a worker died, a commit failed); committed shards are kept. One line, exit 3."""


NOT_RECORDED = ("output", "workers", "storage_options", "max_source_bytes", "reads_in_flight", "num_parts", "part")
"""BuildOptions that change how a build runs, not the bytes of its shards."""


@dataclass(frozen=True)
class BuildOptions:
    input: str
    output: str
    max_samples_per_shard: int = 10_000
    val_fraction: float = 0.0
    seed: int = 0
    image: ImageOptions = field(default_factory=ImageOptions)
    classes: str | None = None
    path_column: str | None = None
    label_column: str | None = "label"
    no_labels: bool = False
    # Not part of what the shards contain, so not in the fingerprint:
    workers: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_source_bytes: int = 256 << 20
    """A source file larger than this is skipped as too_large, unread beyond it (a row naming /dev/zero)."""
    reads_in_flight: int = 32
    """Remote sources each worker reads (and encodes) at once."""
    num_parts: int = 1
    part: int = 0
    """This process builds part `part` (0-based) of `num_parts` slices of the shards."""

    def recorded(self) -> dict[str, Any]:
        """The options that determine the shards' content, as written into index.json (no credentials; not the
        output location, so a copied or moved build still describes itself)."""
        options = asdict(self)
        for name in NOT_RECORDED:
            del options[name]
        return options


@dataclass
class BuildResult:
    index: ShardIndex | None
    """None for a part of a build (finalize writes the index)."""
    written_samples: int
    elapsed: float
    already_complete: bool = False

    @property
    def skipped(self) -> int:
        return sum(self.index.skipped.values()) if self.index else 0

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / max(self.index.input_rows, 1) if self.index else 0.0


def plan_input(options: BuildOptions) -> PlanInput:
    """The input as a stream of rows, read afresh for each pass of the plan."""
    if options.input.lower().endswith(MANIFEST_SUFFIXES):
        label_column = None if options.no_labels else options.label_column
        folder = identity(posixpath.dirname(options.input))

        def rows() -> Iterator[Row | None]:
            return read_manifest(options.input, options.storage_options, options.path_column, label_column)
    else:
        folder = identity(options.input)

        def rows() -> Iterator[Row | None]:
            for row in read_image_folder(options.input, options.storage_options):
                if row is not None and options.no_labels:
                    row.labels = None
                    if row.failure == "missing_label":
                        row.failure = None
                yield row

    return PlanInput(options.input, rows, options.seed, options.val_fraction, folder)


def census_of(source: PlanInput, options: BuildOptions) -> Census:
    given = load_classes(options.classes, options.storage_options) if options.classes else None
    return take_census(source, labelled=not options.no_labels, given_classes=given)


ORDER_RULE = 2
"""Version of the rule that orders a build (plan.py): 2 hashes names relative to the input's folder. In the
fingerprint, so a build interrupted under one rule is never finished under another."""


def fingerprint(options: BuildOptions, census: Census) -> str:
    """Of everything that decides the shards' bytes: the options, every input row, the class table, the order rule."""
    digest = hashlib.sha256(json.dumps(options.recorded(), sort_keys=True).encode())
    digest.update(f"order {ORDER_RULE}".encode())
    digest.update(census.digest.encode())
    digest.update(json.dumps(census.classes, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


RECORD_NAME = re.compile(r"(train|val)-\d{6}\.json")
"""A shard's record (not a part marker, not a temporary copy of a record)."""


def record_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.json"


def part_marker(part: int, num_parts: int) -> str:
    return f"{BUILD_DIR}/part-{part:06d}-of-{num_parts:06d}.json"


def _work_name(options: BuildOptions, finalizing: bool) -> str:
    """Parts (and the finalize step) run side by side into one output, each with its own work folder and lock."""
    if finalizing:
        return "tmp-finalize"
    return "tmp" if options.num_parts == 1 else f"tmp-part-{options.part:06d}"


class Output:
    """The output folder: shards, build records, final files. The only code that writes there."""

    def __init__(self, options: BuildOptions, finalizing: bool = False):
        self.url = options.output
        self.fs, self.root = filesystem(options.output, options.storage_options)
        self.build_dir = join(self.fs, self.root, BUILD_DIR)
        tmp = _work_name(options, finalizing)
        # Folders of this machine are named after the output URL, so that a re-run finds and removes what a killed
        # run left. Shards are written into the work folder before they are committed: beside the output when it is
        # local (a rename commits). The plan's spill files are always on this machine's disk.
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        if is_local(self.fs):
            self.work_dir = join(self.fs, self.build_dir, tmp)
        else:
            self.work_dir = os.path.join(tempfile.gettempdir(), f"build-shards-{digest}-{tmp}")
        self.plan_dir = os.path.join(tempfile.gettempdir(), f"build-shards-plan-{digest}-{tmp}")
        self._local_tmp: str | None = None

    def check_writable(self) -> None:
        # a name of its own: parts starting side by side would remove each other's probe
        probe = join(self.fs, self.build_dir, f".write-probe-{uuid.uuid4().hex}")
        try:
            if is_local(self.fs):  # on object stores makedirs would create a missing bucket: fail instead
                self.fs.makedirs(self.build_dir, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as error:  # permissions, credentials, unreachable endpoints all surface differently
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OutputError(
                f"{self.url}: cannot write the output ({type(error).__name__}: {message}); check the "
                f"path, permissions and credentials"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Refuse a second build of the same part into the same output on this machine (two raced: one traceback,
        one exit 3). Builds on several machines into one object-store prefix are not detected."""
        os.makedirs(os.path.dirname(self.work_dir), exist_ok=True)
        with open(f"{self.work_dir}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(
                    f"{self.url}: another build-shards is writing here; wait for it to finish or choose another "
                    "--output"
                ) from None
            yield

    def tmp_path(self, name: str) -> str:
        """A local file to write a shard into before it is committed."""
        if self._local_tmp is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)  # left behind by a killed run
            os.makedirs(self.work_dir)
            self._local_tmp = self.work_dir
        return os.path.join(self._local_tmp, name)

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def path(self, name: str) -> str:
        return join(self.fs, self.root, name)

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.fs, self.path(name), data)

    def commit(self, writer: ShardWriter | None, record: ShardRecord) -> None:
        """Move a finished shard into place, then write its record (a record alone when every row of the shard
        failed): a record never points at a shard that is not all there."""
        if writer is not None:
            commit_file(writer.path, self.fs, self.path(record.name))
        self.write_record(record)

    def write_record(self, record: ShardRecord) -> None:
        self.write(f"{BUILD_DIR}/{record_name(record.split, record.number)}", record.model_dump_json().encode())

    def remove_stale_temporaries(self) -> None:
        """Half-written files of a killed run go, so that a finished re-run equals an uninterrupted run."""
        for folder in (self.root, self.build_dir):
            remove_stale_temporaries(self.fs, folder)

    def _sizes(self, folder: str) -> dict[str, int]:
        """File name -> size of the files in `folder`, from one listing (a part of a build with 30,000 shards on
        S3 pays a few listing pages, not a request per shard)."""
        self.fs.invalidate_cache(folder)  # other parts wrote here since this process last looked
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["size"] for entry in entries}

    def records(self, wanted: set[str] | None = None) -> list[ShardRecord]:
        """The readable build records (those named in `wanted`, else all); a record whose shard is missing or short
        is dropped (it is redone)."""
        names = [
            name
            for name in self._sizes(self.build_dir)
            if (name in wanted if wanted is not None else RECORD_NAME.fullmatch(name))
        ]
        paths = [join(self.fs, self.build_dir, name) for name in names]
        contents = self.fs.cat(paths, on_error="omit") if paths else {}
        shard_sizes = self._sizes(self.root)
        records = []
        for data in contents.values():
            try:
                record = ShardRecord.model_validate_json(data)
            except (ValidationError, ValueError):
                continue  # a record cut short by a crash: its shard is redone
            if record.name is None or shard_sizes.get(record.name) == record.bytes:
                records.append(record)
        return sorted(records, key=lambda r: (r.split, r.number))


class BackgroundCommitter:
    """Commits finished shards and their records in order on one thread, so encoding goes on while a shard uploads
    (a 1 GiB shard takes seconds to reach S3).

    At most `max_pending` commits wait; then the caller waits too, which bounds the local disk that finished but not
    yet uploaded shards take.
    """

    def __init__(self, output: Output, max_pending: int = 2):
        self.output, self.max_pending = output, max_pending
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._pending: deque[tuple[str, Future]] = deque()

    def commit(self, writer: ShardWriter | None, record: ShardRecord) -> None:
        while len(self._pending) >= self.max_pending:
            self._wait_oldest()
        what = record.name or f"{BUILD_DIR}/{record_name(record.split, record.number)}"
        self._pending.append((what, self._thread.submit(self.output.commit, writer, record)))

    def _wait_oldest(self) -> None:
        what, future = self._pending.popleft()
        try:
            future.result()
        except Exception as error:  # storage errors come in many types
            message = str(error).splitlines()[0] if str(error) else ""
            raise BuildStopped(
                f"{self.output.url}/{what}: commit failed ({type(error).__name__}: {message}); the shards committed "
                f"before it are kept: run the same command again to continue"
            ) from None

    def drain(self) -> None:
        while self._pending:
            self._wait_oldest()

    def close(self) -> None:
        """Wait for a commit under way and drop the queued ones (their shards are redone by a re-run)."""
        self._thread.shutdown(wait=True, cancel_futures=True)


@dataclass
class OpenShard:
    split: str
    number: int
    first_row: int
    end_row: int
    writer: ShardWriter | None = None
    class_counts: Counter = field(default_factory=Counter)
    failures: list[SampleFailure] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)


class ShardAssembler:
    """Appends encoded samples, in plan order, to the open shard of their split and commits each shard when the
    plan moves past it."""

    def __init__(
        self, output: Output, options: BuildOptions, fingerprint: str, first_number: dict[str, int], retried: bool
    ):
        self.output, self.options, self.fingerprint = output, options, fingerprint
        self.first_number = first_number
        """Shard number of rank 0 in each split: 0, or after the existing shards for --retry-failed."""
        self.retried = retried
        self.committer = BackgroundCommitter(output)
        self.open: dict[str, OpenShard] = {}
        self.written = 0

    def add(self, planned: PlannedRow, outcome: Outcome) -> None:
        split, row = planned.split, planned.row
        number = self.first_number[split] + planned.rank // self.options.max_samples_per_shard
        shard = self.open.get(split)
        if shard is None or shard.number != number:
            if shard is not None:
                self._commit(shard)
            shard = self.open[split] = OpenShard(split, number, first_row=planned.rank, end_row=planned.rank)
        shard.end_row = planned.rank + 1
        if outcome.sample is None:
            shard.failures.append(
                SampleFailure(
                    row=planned.position,
                    key=row.key,
                    source=row.source,
                    split=split,
                    reason=outcome.reason,
                    detail=outcome.detail,
                )
            )
            return
        if shard.writer is None:
            shard.writer = ShardWriter(self.output.tmp_path(shard_name(split, number)))
        shard.writer.add(outcome.sample)
        shard.class_counts.update(str(index) for index in row.label_indices)
        if self.retried:
            shard.recovered.append(row.key)
        self.written += 1

    def _commit(self, shard: OpenShard) -> None:
        size, sha256 = shard.writer.close() if shard.writer else (0, "")
        record = ShardRecord(
            fingerprint=self.fingerprint,
            split=shard.split,
            number=shard.number,
            name=shard_name(shard.split, shard.number) if shard.writer else None,
            num_samples=(shard.writer.num_samples if shard.writer else 0),
            bytes=size,
            sha256=sha256,
            first_row=shard.first_row,
            end_row=shard.end_row,
            class_counts=dict(sorted(shard.class_counts.items())),
            failures=shard.failures,
            retried=self.retried,
            recovered_keys=shard.recovered,
        )
        self.committer.commit(shard.writer, record)

    def finish(self) -> None:
        """Commit the open shard of each split and wait until every commit is done."""
        for shard in self.open.values():
            self._commit(shard)
        self.open.clear()
        self.committer.drain()

    def close(self) -> None:
        self.committer.close()


def task(planned: PlannedRow, census: Census) -> EncodeJob:
    """What a worker needs to make the row's sample: its source, key and everything for .cls and .json."""
    row = planned.row
    if row.failure is not None:
        return EncodeJob(row.source, row.failure)
    metadata: dict[str, Any] = {"source": row.source, **row.metadata}
    cls = None
    if census.labelled:
        metadata["labels"] = row.label_indices
        metadata["label_names"] = [str(value) for value in row.labels]
        if not census.multi_label:
            cls = row.label_indices[0]
    return EncodeJob(row.source, None, row.key, metadata, cls)


def _chunks(planned: Iterator[PlannedRow], options: BuildOptions) -> Iterator[list[PlannedRow]]:
    first = list(itertools.islice(planned, CHUNK))
    # remote rows: enough per chunk to keep every reader thread busy past the chunk's slowest read
    remote = any(is_remote_url(p.row.source) for p in first)
    size = max(CHUNK, 4 * options.reads_in_flight) if remote else CHUNK
    rows = itertools.chain(first, planned)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _encoded(
    planned: Iterator[PlannedRow], census: Census, options: BuildOptions
) -> Iterator[tuple[PlannedRow, Outcome]]:
    """Encode in worker processes, yielding results in plan order (workers=0: in this process)."""
    setup = (options.storage_options, options.image, options.max_source_bytes, options.reads_in_flight)
    if options.workers == 0:
        with encoding_here(*setup):
            for chunk in _chunks(planned, options):
                yield from zip(chunk, process_chunk([task(p, census) for p in chunk]), strict=True)
        return
    # concurrent.futures, not multiprocessing.Pool: Pool's worker-handler thread also waits on the result pipe and
    # spins while a result sits in it (0.2 ms of this process's CPU per image, half of it, plus the GIL it takes
    # from the writer), Pool.imap buffers results without bound when the writer falls behind, and a worker that
    # dies leaves Pool waiting forever where this raises BrokenProcessPool.
    # spawn, not fork: s3fs and aiohttp keep event loops and sockets that must not be shared with a child.
    pool = ProcessPoolExecutor(
        options.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=setup,
    )
    in_flight: deque[tuple[list[PlannedRow], Future]] = deque()
    try:
        for chunk in _chunks(planned, options):
            in_flight.append((chunk, pool.submit(process_chunk, [task(p, census) for p in chunk])))
            if len(in_flight) == CHUNKS_IN_FLIGHT_PER_WORKER * options.workers:
                done, future = in_flight.popleft()
                yield from zip(done, future.result(), strict=True)
        while in_flight:
            done, future = in_flight.popleft()
            yield from zip(done, future.result(), strict=True)
    except BrokenProcessPool:
        raise BuildStopped(
            f"{options.output}: a worker process died (killed, or out of memory); the shards committed so far are "
            f"kept: run the same command again to continue"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run(
    assembler: ShardAssembler, planned: Iterator[PlannedRow], total: int, census: Census, options: BuildOptions
) -> None:
    try:
        # the plan's second pass runs when the first row is asked for: before the progress bar, so that a message
        # of its own (the input changed, no room for the spill files) is the only line
        first = next(planned, None)
        planned = itertools.chain([first] if first is not None else [], planned)
        with tqdm(total=total, unit="img", desc="build-shards", smoothing=0.05) as progress:
            for row, outcome in _encoded(planned, census, options):
                assembler.add(row, outcome)
                progress.update()
        assembler.finish()
    finally:
        assembler.close()


def _index(summary: dict[str, Any], records: list[ShardRecord], options: BuildOptions) -> tuple[ShardIndex, list[str]]:
    """index.json and the lines of errors.jsonl from the build records."""
    recovered = {key for record in records for key in record.recovered_keys}
    failures: dict[int, SampleFailure] = {}
    for record in sorted(records, key=lambda r: (r.retried, r.split, r.number)):
        for failure in record.failures:
            failures[failure.row] = failure  # a retry's failure replaces the original one
    ordered = sorted(
        (f for f in failures.values() if f.key not in recovered or f.reason in PLANNING_FAILURES),
        key=lambda f: f.row,
    )
    shards = [r for r in records if r.name]
    splits = {}
    for split in SPLITS:
        mine = [r for r in shards if r.split == split]
        counts: Counter = Counter()
        for record in mine:
            counts.update(record.class_counts)
        if mine:
            splits[split] = SplitTotals(
                num_samples=sum(r.num_samples for r in mine),
                num_shards=len(mine),
                bytes=sum(r.bytes for r in mine),
                class_counts=dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
            )
    index = ShardIndex(
        num_classes=len(summary["classes"]),
        multi_label=summary["multi_label"],
        labelled=summary["labelled"],
        splits=splits,
        shards=[
            ShardInfo(name=r.name, split=r.split, num_samples=r.num_samples, bytes=r.bytes, sha256=r.sha256)
            for r in shards
        ],
        skipped=dict(sorted(Counter(f.reason for f in ordered).items())),
        ignored_files=summary["ignored_files"],
        input_rows=summary["input_rows"],
        options=options.recorded(),
    )
    lines = [
        json.dumps(
            {"key": f.key, "source": f.source, "split": f.split, "reason": f.reason, "detail": f.detail}, sort_keys=True
        )
        for f in ordered
    ]
    return index, lines


def _write_final(
    output: Output, summary: dict[str, Any], records: list[ShardRecord], options: BuildOptions
) -> ShardIndex:
    index, error_lines = _index(summary, records, options)
    classes = dict(sorted(summary["classes"].items(), key=lambda kv: (kv[1], kv[0])))
    output.write("classes.json", (json.dumps(classes, indent=1) + "\n").encode())
    output.write("errors.jsonl", "".join(line + "\n" for line in error_lines).encode())
    output.write("index.json", (index.model_dump_json(indent=1) + "\n").encode())  # last: marks completion
    return index


def build(options: BuildOptions, retry_failed: bool = False) -> BuildResult:
    """Build (or finish building) the shards, or one part of them; raise InputError / OutputError before any work
    on bad arguments."""
    start = time.perf_counter()
    output = Output(options)
    output.check_writable()
    with output.locked():
        if retry_failed:
            return _retry_failed(output, options, start)
        return _build(output, options, start)


def _shards_of(ranks: dict[str, range], per_shard: int) -> set[tuple[str, int]]:
    """The (split, number) of the shards that hold `ranks`."""
    return {
        (split, number)
        for split, wanted in ranks.items()
        if len(wanted)
        for number in range(wanted.start // per_shard, (wanted.stop - 1) // per_shard + 1)
    }


def _rows_of(shard: tuple[str, int], ranks: dict[str, range], per_shard: int) -> int:
    split, number = shard
    return len(range(number * per_shard, min((number + 1) * per_shard, ranks[split].stop)))


def _build(output: Output, options: BuildOptions, start: float) -> BuildResult:
    one_machine = options.num_parts == 1
    if one_machine:
        existing = output.read_json("index.json")
        if existing is not None and existing.get("options") == options.recorded() and output.records():
            return BuildResult(ShardIndex.model_validate(existing), 0, time.perf_counter() - start, True)
        output.remove_stale_temporaries()  # a part leaves them to the finalize step: its neighbours write there
    source = plan_input(options)
    census = census_of(source, options)
    build_id = fingerprint(options, census)
    per_shard = options.max_samples_per_shard
    ranks = part_ranks(census, per_shard, options.num_parts, options.part)
    mine = _shards_of(ranks, per_shard)
    records = output.records(None if one_machine else {record_name(*shard) for shard in mine})
    foreign = [r for r in records if r.fingerprint != build_id]
    if foreign:
        what = "" if one_machine else f" of part {options.part}"
        raise OutputError(
            f"{output.path(BUILD_DIR)}/{record_name(foreign[0].split, foreign[0].number)}: a shard{what} built with "
            f"other inputs or options; write to a new --output, or delete the shards{what} and their records "
            f"({BUILD_DIR}/SPLIT-NNNNNN.json) to build them again"
        )
    done = {(r.split, r.number) for r in records if not r.retried}
    rows = planned_rows(source, census, ranks, output.plan_dir)
    planned = (p for p in rows if (p.split, p.rank // per_shard) not in done)
    total = sum(_rows_of(shard, ranks, per_shard) for shard in mine - done)
    assembler = ShardAssembler(output, options, build_id, first_number=dict.fromkeys(SPLITS, 0), retried=False)
    try:
        if total:
            _run(assembler, planned, total, census, options)
    finally:
        output.cleanup()
    if not one_machine:
        marker = {"fingerprint": build_id, "options": options.recorded(), "census": census.summary()}
        output.write(part_marker(options.part, options.num_parts), json.dumps(marker, indent=1).encode())
        return BuildResult(None, assembler.written, time.perf_counter() - start)
    summary = census.summary()
    index = _write_final(output, summary, _complete_records(output, options, summary, build_id), options)
    return BuildResult(index, assembler.written, time.perf_counter() - start)


def _retry_failed(output: Output, options: BuildOptions, start: float) -> BuildResult:
    """Read again the rows that failed to read or decode in a finished build; add what now works as new shards."""
    existing = output.read_json("index.json")
    if existing is None:
        raise OutputError(
            f"{options.output}: no finished build to retry (index.json missing); run without --retry-failed first"
        )
    output.remove_stale_temporaries()
    source = plan_input(options)
    census = census_of(source, options)
    build_id = fingerprint(options, census)
    records = output.records()
    if any(r.fingerprint != build_id for r in records):
        raise OutputError(f"{options.output}: was built from other inputs or options; retry with the same command")
    failed = set()
    for line in output.fs.cat_file(output.path("errors.jsonl")).splitlines():
        error = json.loads(line)
        if error["reason"] not in PLANNING_FAILURES:
            failed.add(error["key"])
    failed -= {key for r in records for key in r.recovered_keys}
    everything = part_ranks(census, options.max_samples_per_shard, 1, 0)
    rows = planned_rows(source, census, everything, output.plan_dir)
    wanted = [p for p in rows if p.row.key in failed and p.row.failure is None]
    retry_rank = Counter()
    for planned in wanted:  # retried rows fill new shards of their own, after the split's last one
        planned.rank = retry_rank[planned.split]
        retry_rank[planned.split] += 1
    first = {split: max((r.number + 1 for r in records if r.split == split), default=0) for split in SPLITS}
    assembler = ShardAssembler(output, options, build_id, first_number=first, retried=True)
    try:
        _run(assembler, iter(wanted), len(wanted), census, options)
    finally:
        output.cleanup()
    index = _write_final(output, census.summary(), output.records(), options)
    return BuildResult(index, assembler.written, time.perf_counter() - start)


def finalize(options: BuildOptions) -> BuildResult:
    """Check that the `num_parts` parts of a build are all there, from the same inputs and options, and write its
    index.json, classes.json and errors.jsonl: the files a one-machine build ends with."""
    start = time.perf_counter()
    output = Output(options, finalizing=True)
    output.check_writable()
    with output.locked():
        parts = options.num_parts
        markers = [_read_marker(output, part, parts) for part in range(parts)]
        missing = [part for part, marker in enumerate(markers) if marker is None]
        if missing:
            listed = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise OutputError(
                f"{options.output}: part(s) {listed} of {parts} not built (no {part_marker(missing[0], parts)}); "
                f"run build-shards with --num-parts {parts} --part K for each, then --finalize again"
            )
        for part, marker in enumerate(markers):
            _check_part(options, part, marker, markers[0])
        output.remove_stale_temporaries()  # only now: a part still running could be writing one
        summary, build_id = markers[0]["census"], markers[0]["fingerprint"]
        index = _write_final(output, summary, _complete_records(output, options, summary, build_id), options)
        return BuildResult(index, 0, time.perf_counter() - start)


def _read_marker(output: Output, part: int, parts: int) -> dict[str, Any] | None:
    """A part's marker; None when it is missing or not one (its part is then built again)."""
    try:
        marker = output.read_json(part_marker(part, parts))
    except ValueError:
        return None
    if not isinstance(marker, dict) or not {"fingerprint", "options", "census"} <= marker.keys():
        return None
    return marker


def _complete_records(
    output: Output, options: BuildOptions, summary: dict[str, Any], build_id: str
) -> list[ShardRecord]:
    """The records of the whole build, once every shard of the plan has one: what the final files are made of. Two
    builds racing into one output (two machines, one prefix) are caught here, before an index lists a mix."""
    records = output.records()
    if any(r.fingerprint != build_id for r in records):
        raise OutputError(
            f"{options.output}: another build with other inputs or options wrote here at the same time; build into "
            f"a new --output"
        )
    found = {(r.split, r.number) for r in records}
    parts = options.num_parts
    for split in SPLITS:
        shards = shard_count(summary["split_rows"][split], options.max_samples_per_shard)
        for number in range(shards):
            if (split, number) not in found:
                part = next(k for k in range(parts) if number in part_shards(shards, parts, k))
                again = (
                    "the same command again"
                    if parts == 1
                    else f"part {part} again (--num-parts {parts} --part {part}), then --finalize"
                )
                raise OutputError(f"{output.path(shard_name(split, number))}: missing or damaged; run {again}")
    return records


def _check_part(options: BuildOptions, part: int, marker: dict[str, Any], first: dict[str, Any]) -> None:
    """Refuse, in one line, a part built with other options than this command's or from another input."""
    ours = options.recorded()
    theirs = marker.get("options", {})
    differing = [name for name in ours if theirs.get(name) != ours[name]]
    if differing:
        name = differing[0]
        raise OutputError(
            f"{options.output}: part {part} of {options.num_parts} was built with {name}={theirs.get(name)!r}, this "
            f"command has {name}={ours[name]!r}; build every part with the same options"
        )
    if marker["fingerprint"] != first["fingerprint"]:
        raise OutputError(
            f"{options.output}: part {part} of {options.num_parts} was built from other input rows than part 0 (the "
            f"input changed between them); build the parts again from one version of {options.input}"
        )
