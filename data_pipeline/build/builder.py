"""Build WebDataset shards from a corpus: plan, resume, encode in parallel, write shards in order, index.

The plan is a pure function of the inputs and options: rows sorted, shuffled with the seed, each assigned to a
split by a hash of its key. Worker processes encode images and lay each sample out as tar blocks; results come
back in plan order and this process appends them to one open shard per split, so shard boundaries (by sample count
and bytes) are deterministic. A background thread commits finished shards in order, each followed by its record
under `_build/`; a re-run skips the rows those records account for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from data_pipeline.build.images import ImageOptions
from data_pipeline.build.sources import (
    MANIFEST_SUFFIXES,
    Corpus,
    Row,
    assign_classes,
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

SPLITS = ("train", "val")
CHUNK = 16
"""Rows per message to a worker process."""
CHUNKS_IN_FLIGHT_PER_WORKER = 4
"""Bounds the encoded samples held in memory when the shard writer falls behind."""


class OutputError(UserError):
    """The output cannot be written or holds another build: a one-line message, exit 2."""


class BuildStopped(Exception):
    """The build stopped part-way (a worker died, a commit failed); committed shards are kept. One line, exit 3."""


@dataclass(frozen=True)
class BuildOptions:
    input: str
    output: str
    max_samples_per_shard: int = 10_000
    max_bytes_per_shard: int = 1 << 30
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

    def recorded(self) -> dict[str, Any]:
        """The options that determine the shards' content, as written into index.json (no credentials; not the
        output location, so a copied or moved build still describes itself)."""
        options = asdict(self)
        for name in ("output", "workers", "storage_options", "max_source_bytes", "reads_in_flight"):
            del options[name]
        return options


@dataclass
class BuildResult:
    index: ShardIndex
    written_samples: int
    elapsed: float
    already_complete: bool = False

    @property
    def skipped(self) -> int:
        return sum(self.index.skipped.values())

    @property
    def skipped_fraction(self) -> float:
        return self.skipped / max(self.index.input_rows, 1)


def split_of(key: str, val_fraction: float) -> str:
    """A fixed function of the key: the split of a sample never changes between runs or seeds."""
    unit = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if unit < val_fraction else "train"


def load_corpus(options: BuildOptions) -> Corpus:
    if options.input.lower().endswith(MANIFEST_SUFFIXES):
        label_column = None if options.no_labels else options.label_column
        rows = read_manifest(options.input, options.storage_options, options.path_column, label_column)
        ignored = 0
    else:
        rows, ignored = read_image_folder(options.input, options.storage_options)
        if options.no_labels:
            for row in rows:
                row.labels = None
                if row.failure == "missing_label":
                    row.failure = None
    labelled = not options.no_labels
    given = load_classes(options.classes, options.storage_options) if options.classes else None
    classes = assign_classes(rows, given) if labelled else {}
    multi_label = any(row.labels is not None and len(row.labels) > 1 for row in rows)
    return Corpus(rows=rows, classes=classes, multi_label=multi_label, labelled=labelled, ignored_files=ignored)


def shuffled_rows(corpus: Corpus, seed: int) -> list[Row]:
    """The build order: input order (sorted paths or manifest order) shuffled with the seed."""
    rows = list(corpus.rows)
    random.Random(seed).shuffle(rows)
    return rows


def fingerprint(options: BuildOptions, ordered: list[Row]) -> str:
    digest = hashlib.sha256(json.dumps(options.recorded(), sort_keys=True).encode())
    for row in ordered:
        digest.update(f"{row.key}:{row.label_indices}:{row.failure}\n".encode())
    return digest.hexdigest()[:16]


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def record_name(split: str, number: int | None) -> str:
    return f"{split}-tail.json" if number is None else f"{split}-{number:06d}.json"


class Output:
    """The output folder: shards, build records, final files. The only code that writes there."""

    def __init__(self, options: BuildOptions):
        self.url = options.output
        self.fs, self.root = filesystem(options.output, options.storage_options)
        self.build_dir = join(self.fs, self.root, BUILD_DIR)
        # Shards are written here before they are committed: beside the output when it is local (a rename commits),
        # else in a folder named after the output URL, so that a re-run finds and removes what a killed run left.
        if is_local(self.fs):
            self.work_dir = join(self.fs, self.build_dir, "tmp")
        else:
            digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            self.work_dir = os.path.join(tempfile.gettempdir(), f"build-shards-{digest}")
        self._local_tmp: str | None = None

    def check_writable(self) -> None:
        probe = join(self.fs, self.build_dir, ".write-probe")
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
        """Refuse a second build into the same output on this machine (two raced: one traceback, one exit 3). Builds
        on several machines into one object-store prefix are not detected."""
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
        """Move a finished shard into place, then write its record (a record alone for failures past the last
        shard): a record never points at a shard that is not all there."""
        if writer is not None:
            commit_file(writer.path, self.fs, self.path(record.name))
        self.write_record(record)

    def write_record(self, record: ShardRecord) -> None:
        self.write(
            f"{BUILD_DIR}/{record_name(record.split, record.number if record.name else None)}",
            record.model_dump_json().encode(),
        )

    def remove_stale_temporaries(self) -> None:
        """Half-written files of a killed run go, so that a finished re-run equals an uninterrupted run."""
        for folder in (self.root, self.build_dir):
            remove_stale_temporaries(self.fs, folder)

    def records(self) -> list[ShardRecord]:
        """Every readable build record; a record whose shard is missing or short is dropped (it is redone)."""
        records = []
        for path in sorted(self.fs.glob(join(self.fs, self.build_dir, "*.json"))):
            try:
                record = ShardRecord.model_validate_json(self.fs.cat_file(path))
            except (ValidationError, ValueError):
                continue  # a record cut short by a crash: its shard is redone
            if record.name is not None:
                try:
                    if self.fs.size(self.path(record.name)) != record.bytes:
                        continue
                except FileNotFoundError:
                    continue
            records.append(record)
        return records


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
        what = record.name or f"{BUILD_DIR}/{record_name(record.split, None)}"
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


def committed_prefix(records: list[ShardRecord], split: str) -> list[ShardRecord]:
    """The split's shards 0, 1, 2, ... without a gap (shards are committed in order, so this is all of them)."""
    numbered = {r.number: r for r in records if r.split == split and r.name is not None and not r.retried}
    prefix = []
    while len(prefix) in numbered:
        prefix.append(numbered[len(prefix)])
    return prefix


@dataclass
class OpenShard:
    split: str
    number: int
    first_row: int
    writer: ShardWriter | None = None
    class_counts: Counter = field(default_factory=Counter)
    failures: list[SampleFailure] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)


class ShardAssembler:
    """Appends encoded samples, in plan order, to one open shard per split and commits full shards."""

    def __init__(self, output: Output, corpus: Corpus, options: BuildOptions, fingerprint: str, retried: bool):
        self.output, self.corpus, self.options = output, corpus, options
        self.committer = BackgroundCommitter(output)
        self.fingerprint, self.retried = fingerprint, retried
        self.open: dict[str, OpenShard] = {}
        self.written = 0

    def start(self, split: str, number: int, first_row: int) -> None:
        self.open[split] = OpenShard(split, number, first_row)

    def add(self, row: Row, split: str, outcome: Outcome) -> None:
        shard = self.open[split]
        if outcome.sample is None:
            shard.failures.append(
                SampleFailure(
                    row=outcome.position,
                    key=row.key,
                    source=row.source,
                    split=split,
                    reason=outcome.reason,
                    detail=outcome.detail,
                )
            )
            return
        if shard.writer is not None and shard.writer.size_with(outcome.sample) > self.options.max_bytes_per_shard:
            self.commit(split, end_row=outcome.position)
            shard = self.open[split]
        if shard.writer is None:
            shard.writer = ShardWriter(self.output.tmp_path(shard_name(split, shard.number)))
        shard.writer.add(outcome.sample)
        shard.class_counts.update(str(index) for index in row.label_indices)
        if self.retried:
            shard.recovered.append(row.key)
        self.written += 1
        if shard.writer.num_samples >= self.options.max_samples_per_shard:
            self.commit(split, end_row=outcome.position + 1)

    def commit(self, split: str, end_row: int) -> None:
        """Commit the split's open shard and open the next one at end_row."""
        shard = self.open[split]
        size, sha256 = shard.writer.close() if shard.writer else (0, "")
        record = ShardRecord(
            fingerprint=self.fingerprint,
            split=split,
            number=shard.number,
            name=shard_name(split, shard.number) if shard.writer else None,
            num_samples=(shard.writer.num_samples if shard.writer else 0),
            bytes=size,
            sha256=sha256,
            first_row=shard.first_row,
            end_row=end_row,
            class_counts=dict(sorted(shard.class_counts.items())),
            failures=shard.failures,
            retried=self.retried,
            recovered_keys=shard.recovered,
        )
        if shard.writer or shard.failures:  # a record alone: failures after the split's last shard
            self.committer.commit(shard.writer, record)
        self.start(split, shard.number + 1, end_row)

    def finish(self, end_row: int) -> None:
        """Commit the last shard of each split and wait until every commit is done."""
        for split in list(self.open):
            shard = self.open[split]
            if shard.writer or shard.failures:
                self.commit(split, end_row)
        self.committer.drain()

    def close(self) -> None:
        self.committer.close()


def task(position: int, row: Row, corpus: Corpus) -> EncodeJob:
    """What a worker needs to make the row's sample: its source, key and everything for .cls and .json."""
    if row.failure is not None:
        return EncodeJob(position, row.source, row.failure)
    metadata: dict[str, Any] = {"source": row.source, **row.metadata}
    cls = None
    if corpus.labelled:
        metadata["labels"] = row.label_indices
        metadata["label_names"] = [str(value) for value in row.labels]
        if not corpus.multi_label:
            cls = row.label_indices[0]
    return EncodeJob(position, row.source, None, row.key, metadata, cls)


def _outcomes(tasks: list[EncodeJob], options: BuildOptions) -> Iterator[Outcome]:
    """Encode in worker processes, yielding results in plan order (workers=0: in this process)."""
    setup = (options.storage_options, options.image, options.max_source_bytes, options.reads_in_flight)
    # remote rows: enough per chunk to keep every reader thread busy past the chunk's slowest read
    chunk = max(CHUNK, 4 * options.reads_in_flight) if any(is_remote_url(t.source) for t in tasks[:CHUNK]) else CHUNK
    if options.workers == 0:
        with encoding_here(*setup):
            for start in range(0, len(tasks), chunk):
                yield from process_chunk(tasks[start : start + chunk])
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
    in_flight: deque[Future] = deque()
    try:
        for start in range(0, len(tasks), chunk):
            in_flight.append(pool.submit(process_chunk, tasks[start : start + chunk]))
            if len(in_flight) == CHUNKS_IN_FLIGHT_PER_WORKER * options.workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()
    except BrokenProcessPool:
        raise BuildStopped(
            f"{options.output}: a worker process died (killed, or out of memory); the shards committed so far are "
            f"kept: run the same command again to continue"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run(assembler: ShardAssembler, ordered: list[Row], tasks: list[EncodeJob], options: BuildOptions) -> None:
    splits = {task.position: split_of(ordered[task.position].key, options.val_fraction) for task in tasks}
    with tqdm(total=len(tasks), unit="img", desc="build-shards", smoothing=0.05) as progress:
        for outcome in _outcomes(tasks, options):
            assembler.add(ordered[outcome.position], splits[outcome.position], outcome)
            progress.update()


def _index(corpus: Corpus, records: list[ShardRecord], options: BuildOptions) -> tuple[ShardIndex, list[str]]:
    """index.json and the lines of errors.jsonl from the build records."""
    recovered = {key for record in records for key in record.recovered_keys}
    failures: dict[str, SampleFailure] = {}
    for record in sorted(records, key=lambda r: (r.retried, r.split, r.number)):
        for failure in record.failures:
            failures[failure.key] = failure  # a retry's failure replaces the original one
    failures = {key: failure for key, failure in failures.items() if key not in recovered}
    shards = sorted((r for r in records if r.name), key=lambda r: (r.split, r.number))
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
    ordered = sorted(failures.values(), key=lambda f: f.row)
    index = ShardIndex(
        num_classes=len(corpus.classes),
        multi_label=corpus.multi_label,
        labelled=corpus.labelled,
        splits=splits,
        shards=[
            ShardInfo(name=r.name, split=r.split, num_samples=r.num_samples, bytes=r.bytes, sha256=r.sha256)
            for r in shards
        ],
        skipped=dict(sorted(Counter(f.reason for f in ordered).items())),
        ignored_files=corpus.ignored_files,
        input_rows=len(corpus.rows),
        options=options.recorded(),
    )
    lines = [
        json.dumps(
            {"key": f.key, "source": f.source, "split": f.split, "reason": f.reason, "detail": f.detail}, sort_keys=True
        )
        for f in ordered
    ]
    return index, lines


def _write_final(output: Output, corpus: Corpus, records: list[ShardRecord], options: BuildOptions) -> ShardIndex:
    index, error_lines = _index(corpus, records, options)
    classes = dict(sorted(corpus.classes.items(), key=lambda kv: (kv[1], kv[0])))
    output.write("classes.json", (json.dumps(classes, indent=1) + "\n").encode())
    output.write("errors.jsonl", "".join(line + "\n" for line in error_lines).encode())
    output.write("index.json", (index.model_dump_json(indent=1) + "\n").encode())  # last: marks completion
    return index


def build(options: BuildOptions, retry_failed: bool = False) -> BuildResult:
    """Build (or finish building) the shards; raise InputError / OutputError before any work on bad arguments."""
    start = time.perf_counter()
    output = Output(options)
    output.check_writable()
    with output.locked():
        return _build(output, options, retry_failed, start)


def _build(output: Output, options: BuildOptions, retry_failed: bool, start: float) -> BuildResult:
    output.remove_stale_temporaries()
    corpus = load_corpus(options)
    ordered = shuffled_rows(corpus, options.seed)
    build_id = fingerprint(options, ordered)
    records = output.records()
    if any(r.fingerprint != build_id for r in records):
        raise OutputError(
            f"{options.output}: holds shards of a build with other inputs or options; write to a new "
            f"--output or remove {BUILD_DIR}/ and the shards there"
        )
    existing = output.read_json("index.json")
    if retry_failed:
        if existing is None:
            raise OutputError(
                f"{options.output}: no finished build to retry (index.json missing); run without --retry-failed first"
            )
        failed = {json.loads(line)["key"] for line in output.fs.cat_file(output.path("errors.jsonl")).splitlines()}
        done = {key for r in records if r.retried for key in r.recovered_keys}
        wanted = [p for p, row in enumerate(ordered) if row.key in failed - done and row.failure is None]
        assembler = ShardAssembler(output, corpus, options, build_id, retried=True)
        for split in SPLITS:
            taken = [r.number for r in records if r.split == split and r.name]
            assembler.start(split, max(taken, default=-1) + 1, first_row=0)
        tasks = [task(p, ordered[p], corpus) for p in wanted]
    else:
        if existing is not None and existing.get("options") == options.recorded() and records:
            index = ShardIndex.model_validate(existing)
            return BuildResult(index, 0, time.perf_counter() - start, already_complete=True)
        assembler = ShardAssembler(output, corpus, options, build_id, retried=False)
        next_row = {}
        for split in SPLITS:
            prefix = committed_prefix(records, split)
            next_row[split] = prefix[-1].end_row if prefix else 0
            assembler.start(split, len(prefix), next_row[split])
        tasks = [
            task(p, row, corpus)
            for p, row in enumerate(ordered)
            if p >= next_row[split_of(row.key, options.val_fraction)]
        ]
    try:
        _run(assembler, ordered, tasks, options)
        assembler.finish(end_row=len(ordered))
    finally:
        assembler.close()
        output.cleanup()
    index = _write_final(output, corpus, output.records(), options)
    return BuildResult(index, assembler.written, time.perf_counter() - start)
