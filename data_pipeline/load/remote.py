"""Streaming one shard from storage: sequential reads that survive flaky connections, prefetched in a thread.

fsspec's file objects (s3fs, http, gcsfs) read in blocks with ranged GETs. Their own retries cover some errors but
not all: a connection reset in the middle of a body, a truncated body or a 5xx after the library's retries end up as
an exception in our read. `RetryingReader` then reopens the object and seeks to the byte offset it had reached, with
exponential back-off, so a shard never restarts from its first byte. Stalls become errors through the storage
client's read timeout (for s3fs: `config_kwargs={"read_timeout": ...}` in the storage options).

`PrefetchedShard` runs the reader in a thread that fills a bounded queue of chunks, so the network transfer of a
shard overlaps with decoding the one before it (the thread spends its time in socket reads, outside the GIL).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec


class ShardReadError(Exception):
    """A shard could not be read within the retry limits; the message names the URL and the last error."""


class ShardChangedError(ValueError):
    """The object ends before a byte range a saved loader state names (a held sample's): the shard was replaced, and
    no retry brings the bytes back."""


NOT_RETRIED = (FileNotFoundError, PermissionError, IsADirectoryError, ShardChangedError)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    """Consecutive failed attempts at one read before the shard is given up (its remaining samples are skipped)."""
    backoff: float = 0.5
    """Seconds before the first retry; doubled after every failed attempt."""
    max_backoff: float = 30.0
    chunk_size: int = 1 << 20
    """Bytes per read from storage."""
    prefetch_chunks: int = 16
    """Chunks a shard's reader thread may hold ahead of the decoder."""


class ReadCounters:
    """Bytes read and retries, shared by the reader threads of one worker."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.retries = 0

    def add(self, nbytes: int = 0, retries: int = 0) -> None:
        with self.lock:
            self.bytes += nbytes
            self.retries += retries


class RetryingReader:
    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        url: str,
        policy: RetryPolicy,
        counters: ReadCounters,
        offset: int = 0,
    ):
        """Reads `path` from byte `offset` on."""
        self.fs, self.path, self.url, self.policy, self.counters = fs, path, url, policy, counters
        self.offset = offset
        self.size: int | None = None
        self.handle: Any = None

    def _open(self) -> None:
        self.handle = self.fs.open(self.path, "rb", block_size=max(self.policy.chunk_size, 1 << 22))
        if self.size is None:
            self.size = getattr(self.handle, "size", None)
            if self.size is None:
                self.size = self.fs.size(self.path)
        if self.offset:
            self.handle.seek(self.offset)

    def _close(self) -> None:
        if self.handle is not None:
            # a broken connection may fail to close; the handle is dropped either way
            with contextlib.suppress(Exception):
                self.handle.close()
            self.handle = None

    def read(self) -> bytes:
        """The next chunk; b"" at the end of the object. Raises FileNotFoundError or ShardReadError."""
        return self._retried(self._next_chunk)

    def read_range(self, end: int) -> bytes:
        """The bytes from the offset to `end`, in one request (a sample fetched by its place in the shard). Raises
        ShardChangedError, without retrying, when the object ends before `end`."""
        return self._retried(lambda: self._range(end))

    def _next_chunk(self) -> bytes:
        if self.handle is None:
            self._open()
        data = self.handle.read(self.policy.chunk_size)
        if not data and self.size is not None and self.offset < self.size:
            raise OSError(f"body ended at byte {self.offset} of {self.size}")
        return data

    def _range(self, end: int) -> bytes:
        # A failed or short read may be a broken transfer (retried) or an object that now ends before `end` (S3
        # answers 416, a local file or a range straddling the end gives fewer bytes): not retried, since eight
        # attempts with back-off waited about 90 s for bytes that do not exist.
        try:
            data = self.fs.cat_file(self.path, start=self.offset, end=end)
        except NOT_RETRIED:
            raise
        except Exception:
            self._check_reaches(end)
            raise
        if len(data) != end - self.offset:
            self._check_reaches(end)
            raise OSError(f"{len(data)} bytes for the range {self.offset}-{end}")
        return data

    def _check_reaches(self, end: int) -> None:
        """Raise ShardChangedError if the object is known to end before byte `end`."""
        try:
            size = self.fs.size(self.path)
        except FileNotFoundError:
            raise
        except Exception:  # the storage is what fails: the read is retried
            return
        if size is not None and size < end:
            raise ShardChangedError(f"{self.url} is {size} bytes; the range {self.offset}-{end} is past its end")

    def _retried(self, read: Callable[[], bytes]) -> bytes:
        attempt = 0
        while True:
            try:
                data = read()
                self.offset += len(data)
                self.counters.add(nbytes=len(data))
                return data
            except NOT_RETRIED:
                raise
            except Exception as error:  # any transport error: reopen at the offset reached
                self._close()
                attempt += 1
                if attempt > self.policy.max_retries:
                    raise ShardReadError(
                        f"{self.url}: gave up after {self.policy.max_retries} retries at byte "
                        f"{self.offset}: {type(error).__name__}: {error}"
                    ) from None
                self.counters.add(retries=1)
                time.sleep(min(self.policy.backoff * 2 ** (attempt - 1), self.policy.max_backoff))

    def close(self) -> None:
        self._close()


class PrefetchedShard(io.RawIOBase):
    """A read-only stream of one shard, filled by a background thread; errors surface in `read`."""

    def __init__(self, reader: RetryingReader):
        super().__init__()
        self.reader = reader
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=reader.policy.prefetch_chunks)
        self.stopped = threading.Event()
        self.buffer = memoryview(b"")
        self.finished = False
        self.thread = threading.Thread(target=self._fill, name=f"prefetch {reader.url}", daemon=True)
        self.thread.start()

    def _put(self, item: bytes | BaseException) -> bool:
        while not self.stopped.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            while not self.stopped.is_set():
                data = self.reader.read()
                if not self._put(data) or not data:
                    break
        except BaseException as error:
            self._put(error)
        finally:
            self.reader.close()

    def readable(self) -> bool:
        return True

    def _fill_buffer(self) -> None:
        while not self.buffer and not self.finished:
            item = self.chunks.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if not item:
                self.finished = True
            self.buffer = memoryview(item)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes. A whole chunk that fits is handed over as it came: RawIOBase.read would copy it twice
        (into a bytearray, then into bytes), which cost about a tenth of one stream's throughput from moto here."""
        if size < 0:
            return self.readall()
        self._fill_buffer()
        chunk = self.buffer.obj
        if isinstance(chunk, bytes) and len(self.buffer) == len(chunk) <= size:
            self.buffer = memoryview(b"")
            return chunk
        return super().read(size)

    def readinto(self, target: Any) -> int:
        self._fill_buffer()
        count = min(len(target), len(self.buffer))
        target[:count] = self.buffer[:count]
        self.buffer = self.buffer[count:]
        return count

    def close(self) -> None:
        self.stopped.set()
        super().close()
