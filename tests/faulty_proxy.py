"""HTTP on loopback for the tests and benchmarks: a server for a folder, and a proxy in front of the S3 server that
breaks object reads the way real networks and object stores do.

`serve_folder` serves a folder's files (an image host, shards over plain HTTP).

`FaultyProxy`:

Every request is forwarded to the upstream endpoint. GETs of `.tar` objects (or of another `faulted_suffix`) are
numbered, and the ones that the schedule picks fail in one of three ways (with `transient`, an object only the first
time it is picked: a client's retry then gets it, whatever the order concurrent requests arrive in):
- `reset`: the status line, the headers and half of the body are sent, then the connection is closed;
- `503`: an S3 `SlowDown` error instead of the object;
- `stall`: nothing is sent for longer than the client's read timeout, then the connection is closed.
Writes (PUT, POST) of keys containing `fail_writes_to` get a 503 every time: an upload that cannot succeed. Writes
take `write_seconds_per_mb` per MB of body (a store's time to take a large file). Every object upload that starts (a
single PUT, or the POST that opens a multipart upload) is counted by key in `uploads`, every GET in `downloads`, and
the body bytes of GET answers in `bytes_served`. `latency_seconds` delays every request before it is forwarded (object
storage's time to first byte; the peer benchmark uses 20 ms). Bodies are passed on as they arrive, so a reader sees the
first bytes of a large object before the last ones leave the upstream.

With `serve_ranges`, a GET of a byte range is answered from a copy of the object the proxy fetched whole once: moto
reads and copies the whole object for every ranged GET (about 1 ms per MB of the object here, 16 ms for a range of a
16 MB shard, one request at a time), which S3 does not; a reader that fetches samples by their ranges would otherwise
pay a cost no object store charges.

Both listen on a `LoopbackServer`: its socket queues many pending connections, as a web server's or an object store's
does, not Python's default of 5.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import http.client
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

FAULTS = ("reset", "503", "stall")
RANGE = re.compile(r"bytes=(\d+)-(\d+)")
RANGE_DROPPED_HEADERS = ("transfer-encoding", "connection", "content-length", "content-range", "x-amz-checksum")
"""Headers of a whole object's answer that a range's answer states otherwise or not at all (prefixes)."""
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class LoopbackServer(ThreadingHTTPServer):
    """A thread per connection, and a listen queue as deep as a real server's."""

    request_queue_size = 1024
    """Connections the kernel queues before the server accepts them. With socketserver's default of 5, a loader
    opening 20 connections at once (16 sample fetches and 4 shard streams) overflowed the queue; the kernel dropped
    the SYN and the client sent it again a second later: a resumed first batch (`bench_peers`' setting, one worker) took
    1.6-2.0 s instead of 0.8-1.1 s in 1 to 5 of 8 fresh processes (`nstat`: TcpExtListenOverflows), and 0.8-0.9 s in all
    8 with a queue of 128. `bench_build_remote`'s 256 download threads starting at once hit the same limit."""


class QuietFileHandler(SimpleHTTPRequestHandler):
    """A folder's files, without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """The URL of `folder` served over HTTP on loopback by a thread of this process, until the block ends."""
    server = LoopbackServer(("127.0.0.1", 0), functools.partial(QuietFileHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class FaultyProxy:
    def __init__(
        self,
        upstream: str,
        every: int = 2,
        stall_seconds: float = 3.0,
        fail_writes_to: str | None = None,
        write_seconds_per_mb: float = 0.0,
        faulted_suffix: str = ".tar",
        transient: bool = False,
        latency_seconds: float = 0.0,
        serve_ranges: bool = False,
    ):
        """Fault every `every`-th GET of a shard (0: none), cycling through FAULTS."""
        self.upstream = urlsplit(upstream)
        self.faulted_suffix, self.transient = faulted_suffix, transient
        self.faulted_keys: set[str] = set()
        self.active_gets = self.most_active_gets = 0  # GETs being answered at once, and the most seen
        self.fail_writes_to = fail_writes_to
        self.write_seconds_per_mb = write_seconds_per_mb
        self.latency_seconds = latency_seconds
        self.serve_ranges = serve_ranges
        self.copies: dict[str, tuple[list[tuple[str, str]], bytes]] = {}  # path -> the object's headers and bytes
        self.copying: dict[str, threading.Lock] = {}  # path -> held while its copy is fetched
        self.bytes_served = 0
        self.uploads: collections.Counter[str] = collections.Counter()
        self.downloads: collections.Counter[str] = collections.Counter()
        self.every, self.stall_seconds = every, stall_seconds
        self.lock = threading.Lock()
        self.shard_gets = 0
        self.injected: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.server = LoopbackServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _count(self, method: str, path: str) -> None:
        parts = urlsplit(path)
        key = parts.path.lstrip("/")
        single = method == "PUT" and "partNumber" not in parts.query
        with self.lock:
            if single or (method == "POST" and parts.query.startswith("uploads")):
                self.uploads[key] += 1
            elif method == "GET":
                self.downloads[key] += 1

    def _fault_for(self, method: str, path: str) -> str | None:
        if method in ("PUT", "POST") and self.fail_writes_to and self.fail_writes_to in path:
            return "503"
        key = urlsplit(path).path
        if method != "GET" or not self.every or not key.endswith(self.faulted_suffix):
            return None
        with self.lock:
            if self.transient and key in self.faulted_keys:
                return None
            self.shard_gets += 1
            if self.shard_gets % self.every:
                return None
            self.faulted_keys.add(key)
            fault = FAULTS[(self.shard_gets // self.every) % len(FAULTS)]
            self.injected[fault] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if self.command != "GET":
                    return self._answer()
                with proxy.lock:
                    proxy.active_gets += 1
                    proxy.most_active_gets = max(proxy.most_active_gets, proxy.active_gets)
                try:
                    self._answer()
                finally:
                    with proxy.lock:
                        proxy.active_gets -= 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._fault_for(self.command, self.path)
                proxy._count(self.command, self.path)
                if self.command in ("PUT", "POST") and body:
                    time.sleep(proxy.write_seconds_per_mb * len(body) / 1e6)
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                time.sleep(proxy.latency_seconds)
                ranged = RANGE.fullmatch(self.headers.get("Range", "")) if self.command == "GET" else None
                if proxy.serve_ranges and ranged and self._answer_range(*ranged.groups(), fault):
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() != "host"}
                headers["Host"] = proxy.upstream.netloc
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                stated = response.getheader("Content-Length")
                if self.command == "HEAD":  # no body, but the object's size
                    size, chunks = int(stated or 0), iter(())
                elif stated is None:  # a chunked answer: read whole to state its length
                    payload = response.read()
                    size, chunks = len(payload), iter((payload,))
                else:
                    size, chunks = int(stated), iter(lambda: response.read(1 << 20), b"")
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self._send_body(chunks, size, fault)
                upstream.close()

            def _send_body(self, chunks: Iterator[bytes], size: int, fault: str | None) -> None:
                """Pass the body on as it arrives; a reset sends half of it, then closes the connection."""
                limit = size // 2 if fault == "reset" and size > 1 else size
                sent = 0
                for chunk in chunks:
                    chunk = chunk[: limit - sent]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if self.command == "GET":  # counted as sent: a reader may drop the connection mid-body
                        with proxy.lock:
                            proxy.bytes_served += len(chunk)
                    if sent >= limit:
                        break
                if sent < size:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)

            def _answer_range(self, first: str, last: str, fault: str | None) -> bool:
                """Answer a GET of bytes first-last from the proxy's copy of the object; False when the object cannot
                be fetched or the range is outside it (the upstream's answer is then forwarded as it is)."""
                path = urlsplit(self.path).path
                with proxy.lock:
                    copying = proxy.copying.setdefault(path, threading.Lock())
                with copying:  # the first ranged GETs of an object wait for one copy, not one each
                    if path not in proxy.copies and not self._copy(path):
                        return False
                headers, body = proxy.copies[path]
                start, end = int(first), min(int(last) + 1, len(body))
                if start >= end:
                    return False
                self.send_response(206)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                self._send_body(iter((body[start:end],)), end - start, fault)
                return True

            def _copy(self, path: str) -> bool:
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "range")}
                upstream.request("GET", self.path, headers={**headers, "Host": proxy.upstream.netloc})
                response = upstream.getresponse()
                body = response.read()
                upstream.close()
                if response.status != 200:
                    return False
                kept = [(k, v) for k, v in response.getheaders() if not k.lower().startswith(RANGE_DROPPED_HEADERS)]
                with proxy.lock:
                    proxy.copies[path] = (kept, body)
                return True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
