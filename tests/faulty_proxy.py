"""An HTTP proxy in front of the S3 server that breaks object reads the way real networks and object stores do.

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
"""

from __future__ import annotations

import collections
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("reset", "503", "stall")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


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
    ):
        """Fault every `every`-th GET of a shard (0: none), cycling through FAULTS."""
        self.upstream = urlsplit(upstream)
        self.faulted_suffix, self.transient = faulted_suffix, transient
        self.faulted_keys: set[str] = set()
        self.active_gets = self.most_active_gets = 0  # GETs being answered at once, and the most seen
        self.fail_writes_to = fail_writes_to
        self.write_seconds_per_mb = write_seconds_per_mb
        self.latency_seconds = latency_seconds
        self.bytes_served = 0
        self.uploads: collections.Counter[str] = collections.Counter()
        self.downloads: collections.Counter[str] = collections.Counter()
        self.every, self.stall_seconds = every, stall_seconds
        self.lock = threading.Lock()
        self.shard_gets = 0
        self.injected: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
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
                # a reset sends half of the body, then closes the connection
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
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
