"""The work one builder process does per input row: read the bytes, check and re-encode the image, lay the sample
out as tar blocks.

Runs in worker processes; the options arrive once through `init_worker`, the rows as small `EncodeJob`s. Everything
per sample that can be done apart from the shard it goes into is done here, because the process that writes the
shards is shared by all workers.

Remote sources (s3://, http(s)://) are read `reads_in_flight` rows at a time, each row read and encoded on a thread
of the worker: a request's latency is waiting, not work, and PIL releases the GIL while it decodes, resizes and
encodes, so the threads also share the cores. Local files are read one after another (threads gain nothing there,
and one worker per core is what --workers already gives).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from data_pipeline.build.images import ImageOptions, SampleError, encode_image
from data_pipeline.format.sample import encode_members
from data_pipeline.format.tar_writer import sample_blocks
from data_pipeline.storage import is_remote_url, open_url

READ_ATTEMPTS = 3

_storage_options: dict[str, Any] = {}
_image_options = ImageOptions()
_max_source_bytes = 0
_readers: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class EncodeJob:
    source: str
    failure: str | None
    """Set when the row was rejected while planning; then nothing is read."""
    key: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The sample's .json without the image's original width and height, which only the worker learns."""
    cls: int | None = None
    """The .cls member: the class index of a single-label sample."""


@dataclass(frozen=True)
class Outcome:
    sample: bytes | None
    """The sample's tar blocks, ready to append to a shard; None when it was skipped for `reason`."""
    reason: str = ""
    detail: str = ""


def init_worker(
    storage_options: dict[str, Any], image_options: ImageOptions, max_source_bytes: int, reads_in_flight: int
) -> None:
    """Set up a process that encodes rows. PIL's process-wide decompression-bomb limit is lifted in it: the
    --max-pixels check in images.py replaces it, with a reason the build counts."""
    global _storage_options, _image_options, _max_source_bytes, _readers
    _storage_options, _image_options, _max_source_bytes = storage_options, image_options, max_source_bytes
    _readers = ThreadPoolExecutor(reads_in_flight, thread_name_prefix="read") if reads_in_flight > 1 else None
    Image.MAX_IMAGE_PIXELS = None


@contextlib.contextmanager
def encoding_here(
    storage_options: dict[str, Any], image_options: ImageOptions, max_source_bytes: int, reads_in_flight: int
) -> Iterator[None]:
    """`init_worker` for this process (a build with --workers 0), undone afterwards: a loader in the same process
    keeps PIL's decompression-bomb limit."""
    global _readers
    limit = Image.MAX_IMAGE_PIXELS
    init_worker(storage_options, image_options, max_source_bytes, reads_in_flight)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit
        if _readers is not None:
            _readers.shutdown()
            _readers = None


def read_source(source: str, storage_options: dict[str, Any], max_bytes: int) -> bytes:
    """Read a whole file of at most `max_bytes`; transient errors are retried with backoff, a missing or too large
    file is not (a manifest row naming /dev/zero read 2.7 GB, three times, before this limit)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            with open_url(source, "rb", storage_options) as handle:
                data = handle.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise SampleError("too_large", f"more than --max-source-bytes {max_bytes}")
            return data
        except SampleError:
            raise
        except FileNotFoundError:
            raise SampleError("unreadable", "no such file") from None
        except (IsADirectoryError, PermissionError) as error:
            raise SampleError("unreadable", f"{type(error).__name__}: {error}") from None
        except Exception as error:  # network and storage errors come in many types
            if attempt + 1 == READ_ATTEMPTS:
                raise SampleError("unreadable", f"{type(error).__name__}: {error}") from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def process_chunk(tasks: list[EncodeJob]) -> list[Outcome]:
    """Several rows per message to a worker and back (the pipes' per-message cost is then small), in order; remote
    ones on the reader threads."""
    if _readers is None or not any(is_remote_url(task.source) for task in tasks):
        return [process(task) for task in tasks]
    return list(_readers.map(process, tasks))


def process(task: EncodeJob) -> Outcome:
    if task.failure is not None:
        return Outcome(None, task.failure)
    try:
        image = encode_image(read_source(task.source, _storage_options, _max_source_bytes), _image_options)
    except SampleError as error:
        return Outcome(None, error.reason, error.detail)
    width, height = image.original_size
    # the task's metadata wins over the measured size: a manifest column named width is the user's to keep
    members = encode_members(image.jpeg, task.cls, {"width": width, "height": height, **task.metadata})
    return Outcome(sample_blocks(task.key, members))
