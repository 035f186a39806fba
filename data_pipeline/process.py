"""The work one builder process does per input row: read the bytes, check and re-encode the image.

Runs in worker processes; the options arrive once through `init_worker`, the rows as small tuples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import fsspec

from data_pipeline.images import EncodedImage, ImageOptions, SampleError, encode_image

READ_ATTEMPTS = 3

_storage_options: dict[str, Any] = {}
_image_options = ImageOptions()


@dataclass(frozen=True)
class Task:
    position: int
    """Position of the row in the build's shuffled order."""
    source: str
    failure: str | None
    """Set when the row was rejected while planning; then nothing is read."""


@dataclass(frozen=True)
class Outcome:
    position: int
    image: EncodedImage | None
    reason: str = ""
    detail: str = ""


def init_worker(storage_options: dict[str, Any], image_options: ImageOptions) -> None:
    global _storage_options, _image_options
    _storage_options, _image_options = storage_options, image_options


def read_source(source: str, storage_options: dict[str, Any]) -> bytes:
    """Read a whole file; transient errors are retried with backoff, a missing file is not."""
    options = storage_options if "://" in source and not source.startswith("file://") else {}
    for attempt in range(READ_ATTEMPTS):
        try:
            with fsspec.open(source, "rb", **options) as handle:
                return handle.read()
        except FileNotFoundError:
            raise SampleError("unreadable", "no such file") from None
        except (IsADirectoryError, PermissionError) as error:
            raise SampleError("unreadable", f"{type(error).__name__}: {error}") from None
        except Exception as error:  # network and storage errors come in many types
            if attempt + 1 == READ_ATTEMPTS:
                raise SampleError("unreadable", f"{type(error).__name__}: {error}") from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def process(task: Task) -> Outcome:
    if task.failure is not None:
        return Outcome(task.position, None, task.failure)
    try:
        image = encode_image(read_source(task.source, _storage_options), _image_options)
    except SampleError as error:
        return Outcome(task.position, None, error.reason, error.detail)
    return Outcome(task.position, image)
