"""A fault-injecting HTTP/1.1 proxy between workers and the S3 test server.

Workers are pointed at ``proxy.url`` instead of the S3 server; every request is forwarded
upstream over a kept-alive connection, and a seeded random draw decides, per request,
whether to:

- answer it with an S3 error (500 ``InternalError``, 503 ``SlowDown``, 503
  ``ServiceUnavailable``) without forwarding it: the request never happened;
- forward it and then cut the answer mid-body (or close the connection before any answer
  when there is no body): the request DID happen, its answer was lost;
- delay it (latency), and slow down request bodies (a bandwidth cap per connection).

It can make multipart uploads look as they do on an SSE-KMS bucket (``kms_parts``: ETags
that are not MD5s, part checksums listed), drop request headers before forwarding (a store
that ignores conditional writes: ``strip_headers=("If-Match", "If-None-Match")``), and
answer HEAD requests with a fixed status (every HEAD, or only those the server answers 404
to: what S3 does for a missing key when the caller lacks ``s3:ListBucket``).

The proxy understands HTTP/1.1 framing (``Content-Length``, chunked bodies both ways,
``Expect: 100-continue``, keep-alive, bodies ended by close) and answers only on loopback.
It is bounded: it stops by itself after ``max_requests`` requests or ``max_seconds``
seconds, and always when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
MAX_LINE = 64 * 1024
MAX_HEADERS = 200
PIECE = 64 * 1024

ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    # What a store without conditional writes answers to If-Match / If-None-Match.
    "notimplemented": (501, "NotImplemented", "A header you provided is not implemented."),
}


@dataclass(frozen=True)
class Request:
    """One parsed request: what a fault rule can look at."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float = 0.0  # when its head arrived (monotonic)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def operation(self) -> str:
        """A short S3 operation name, for statistics."""
        query = self.query
        if self.method == "PUT" and "partNumber=" in query:
            return "UploadPart"
        if self.method == "POST" and "uploads" in query.split("&"):
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId=" in query:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId=" in query:
            return "AbortMultipartUpload"
        if self.method == "GET" and "uploadId=" in query:
            return "ListParts"
        if self.method == "GET" and "uploads" in query.split("&"):
            return "ListMultipartUploads"
        if self.method == "PUT" and self.header("x-amz-copy-source"):
            return "CopyObject"
        return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject"}.get(
            self.method, self.method
        )


@dataclass
class FaultPlan:
    """What the proxy does to traffic. Rates are fractions of the requests that ``match``."""

    error_rate: float = 0.0
    cut_rate: float = 0.0
    errors: tuple[str, ...] = ("500", "503", "slowdown")
    latency: tuple[float, float] = (0.0, 0.0)
    bandwidth: int | None = None  # bytes per second of request body, per connection
    head_status: int | None = None  # answer every HEAD with this status
    head_missing_status: int | None = None  # answer a HEAD the server says 404 to with this
    # Request headers removed before forwarding (case-insensitive): a store or proxy that
    # drops what it does not know, e.g. ("If-Match", "If-None-Match").
    strip_headers: tuple[str, ...] = ()
    # Answer multipart uploads as S3 does on an SSE-KMS bucket, which the test servers do
    # not: part ETags that are not the part's MD5, and ListParts listing each part's
    # SHA-256 as it was sent with the part (S3 keeps it; moto and SeaweedFS list none).
    # The relay maps its ETags back to the server's in CompleteMultipartUpload.
    kms_parts: bool = False
    match: Callable[[Request], bool] = field(default=lambda request: True)
    # Answer a request here instead of forwarding it: (status, headers, body), or None to
    # forward it (e.g. a registry's 429 with Retry-After, or a 401 with a challenge).
    answer: Callable[[Request], tuple[int, list[tuple[str, str]], bytes] | None] | None = None


WRITES = ("CreateMultipartUpload", "UploadPart", "PutObject")


@dataclass(frozen=True)
class Write:
    """One request that wrote object data, answered 2xx: who wrote what, and when."""

    operation: str
    path: str
    part: int
    size: int
    start: float
    end: float


@dataclass
class Stats:
    """What happened, for assertions and for the test report."""

    requests: int = 0
    errors: int = 0
    cuts: int = 0
    head_rewrites: int = 0
    headers_stripped: int = 0
    kms_rewrites: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    operations: Counter[str] = field(default_factory=Counter)
    faults_by_operation: Counter[str] = field(default_factory=Counter)
    writes: list[Write] = field(default_factory=list)

    def overlapping_writes(self) -> list[tuple[Write, Write]]:
        """Pairs of writes of the same part of the same object at the same time.

        One writer sends different parts in parallel; two writers of one blob at once send
        the same part numbers, and that is what this finds.
        """
        by_part: dict[tuple[str, int], list[Write]] = {}
        for write in self.writes:
            if write.operation != "CreateMultipartUpload":
                by_part.setdefault((write.path, write.part), []).append(write)
        pairs = []
        for writes in by_part.values():
            writes.sort(key=lambda w: w.start)
            for index, later in enumerate(writes):
                pairs += [(first, later) for first in writes[:index] if later.start < first.end]
        return pairs

    def starts_by_object(self) -> Counter[str]:
        """Uploads started per object path: CreateMultipartUpload or a whole PutObject."""
        return Counter(
            w.path for w in self.writes if w.operation in ("CreateMultipartUpload", "PutObject")
        )

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.errors} errors injected, {self.cuts} answers cut, "
            f"{self.head_rewrites} HEADs rewritten, {self.bytes_up} bytes up"
        )


class _Closed(Exception):
    """The peer closed the connection (cleanly, between requests, or not)."""


def _readline(rfile: BinaryIO) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        raise _Closed
    if len(line) > MAX_LINE:
        raise ValueError("header line too long")
    return line


def _read_head(rfile: BinaryIO) -> tuple[bytes, list[tuple[str, str]]]:
    """The start line and the header fields (blank lines before a request are skipped)."""
    start = _readline(rfile)
    while start in (b"\r\n", b"\n"):
        start = _readline(rfile)
    headers: list[tuple[str, str]] = []
    while True:
        line = _readline(rfile)
        if line in (b"\r\n", b"\n"):
            return start.rstrip(b"\r\n"), headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or len(headers) >= MAX_HEADERS:
            raise ValueError(f"bad header line {line[:60]!r}")
        headers.append((name.strip(), value.strip()))


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers:
        if key.lower() == lowered:
            return value
    return None


def _head_fields(lines: list[str]) -> list[tuple[str, str]]:
    """Header fields of a raw head's lines (the status line and blanks are skipped)."""
    fields = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields.append((name.strip(), value.strip()))
    return fields


def _is_chunked(headers: list[tuple[str, str]]) -> bool:
    encoding = _get(headers, "Transfer-Encoding") or ""
    return "chunked" in encoding.lower()


class _Pacer:
    """Sleeps so that bytes pass at no more than ``rate()`` per second (None: no limit)."""

    def __init__(self, rate: Callable[[], int | None]) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def __call__(self, count: int) -> None:
        rate = self.rate()
        if not rate:
            return
        self.sent += count
        ahead = self.sent / rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


def _read_exact(rfile: BinaryIO, size: int, pace: _Pacer | None = None) -> bytes:
    out = bytearray()
    while len(out) < size:
        piece = rfile.read(min(PIECE, size - len(out)))
        if not piece:
            raise _Closed
        out += piece
        if pace is not None:
            pace(len(piece))
    return bytes(out)


def _read_chunked(rfile: BinaryIO, pace: _Pacer | None = None) -> bytes:
    """A chunked body exactly as sent (sizes, extensions, trailers), to relay unchanged."""
    raw = bytearray()
    while True:
        line = _readline(rfile)
        raw += line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:
                trailer = _readline(rfile)
                raw += trailer
                if trailer in (b"\r\n", b"\n"):
                    return bytes(raw)
        raw += _read_exact(rfile, size + 2, pace)


def _error_body(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()


class FaultProxy:
    """``with FaultProxy(upstream, plan, seed=...) as proxy:`` ... ``proxy.url``."""

    def __init__(
        self,
        upstream: str,
        plan: FaultPlan | None = None,
        *,
        seed: int = 0,
        max_requests: int = 200_000,
        max_seconds: float = 900.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in (LOOPBACK, "localhost") or parts.port is None:
            raise ValueError("the fault proxy only forwards to a loopback server")
        self.upstream = (LOOPBACK, parts.port)
        self.plan = plan or FaultPlan()
        self.stats = Stats()
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._kms_etags: dict[str, str] = {}  # relayed ETag -> the server's
        self._kms_sums: dict[tuple[str, str, int], str] = {}  # part -> SHA-256 sent with it
        self._conns: set[socket.socket] = set()
        self._idle: set[socket.socket] = set()  # waiting for their next request
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection, wait for the threads (bounded)."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _expired(self) -> bool:
        return (
            self._stopped.is_set()
            or time.monotonic() - self._started > self.max_seconds
            or self.stats.requests >= self.max_requests
        )

    def _accept_loop(self) -> None:
        while not self._expired():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            conn.settimeout(300)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()
        # Out of budget: accept nothing more, drop idle connections; a request being
        # answered is finished first (its thread then sees the budget spent and ends).
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            idle = list(self._idle)
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ decisions

    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _choice(self, options: tuple[str, ...]) -> str:
        with self._lock:
            return self._rng.choice(options)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # ------------------------------------------------------------------ one connection

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        upstream: tuple[socket.socket, BinaryIO] | None = None
        try:
            while not self._expired():
                pace = _Pacer(lambda: self.plan.bandwidth)
                with self._lock:
                    self._idle.add(conn)
                try:
                    request = self._read_request(conn, rfile, pace)
                except (_Closed, OSError, ValueError):
                    return
                finally:
                    with self._lock:
                        self._idle.discard(conn)
                plan = self.plan  # read now: a test may change it while a connection idles
                with self._lock:
                    self.stats.requests += 1
                    self.stats.bytes_up += len(request.body)
                    self.stats.operations[request.operation] += 1
                low, high = plan.latency
                if high > 0:
                    time.sleep(low + (high - low) * self._draw())
                keep = (_get(request.headers, "Connection") or "").lower() != "close"
                matched = plan.match(request)

                custom = plan.answer(request) if plan.answer is not None else None
                if custom is not None:
                    self._answer_custom(conn, request, *custom)
                    if not keep:
                        return
                    continue
                if matched and self._draw() < plan.error_rate:
                    self._answer_error(conn, request, self._choice(plan.errors))
                    if not keep:
                        return
                    continue
                if request.method == "HEAD" and plan.head_status is not None:
                    self._count(head_rewrites=1)
                    self._answer_status(conn, plan.head_status)
                    if not keep:
                        return
                    continue

                if plan.strip_headers:
                    request = self._strip(request, plan.strip_headers)
                if plan.kms_parts:
                    request = self._kms_request(request)
                if upstream is None:
                    upstream = self._connect()
                try:
                    status, head, body, close_after = self._exchange(upstream, request)
                except (_Closed, OSError):
                    # A kept-alive upstream connection went stale: one fresh try.
                    self._close_upstream(upstream)
                    upstream = self._connect()
                    status, head, body, close_after = self._exchange(upstream, request)
                if close_after:
                    self._close_upstream(upstream)
                    upstream = None
                if plan.kms_parts and 200 <= status < 300:
                    head, body = self._kms_answer(request, head, body)

                if (
                    request.method == "HEAD"
                    and status == 404
                    and plan.head_missing_status is not None
                ):
                    self._count(head_rewrites=1)
                    self._answer_status(conn, plan.head_missing_status)
                    if not keep:
                        return
                    continue
                if matched and self._draw() < plan.cut_rate:
                    with self._lock:
                        self.stats.cuts += 1
                        self.stats.faults_by_operation[f"cut {request.operation}"] += 1
                    if len(body) > 1:
                        conn.sendall(head + body[: len(body) // 2])
                    return  # the answer is lost: close the client connection
                conn.sendall(head + body)
                self._count(bytes_down=len(body))
                if request.operation in WRITES and 200 <= status < 300:
                    self._record_write(request)
                if close_after or not keep:
                    return
        finally:
            if upstream is not None:
                self._close_upstream(upstream)
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                rfile.close()
            with contextlib.suppress(OSError):
                conn.close()

    # ------------------------------------------------------------------ SSE-KMS parts

    @staticmethod
    def _opaque(etag: str) -> str:
        """A part ETag as SSE-KMS gives it: 32 hex digits that are not the MD5."""
        return '"' + hashlib.sha256(b"kms " + etag.strip('"').encode()).hexdigest()[:32] + '"'

    def _part_of(self, request: Request) -> tuple[str, str, int]:
        query = dict(
            item.split("=", 1) for item in request.query.split("&") if "=" in item
        )
        return request.path, query.get("uploadId", ""), int(query.get("partNumber", "0"))

    def _kms_request(self, request: Request) -> Request:
        if request.operation != "CompleteMultipartUpload" or _is_chunked(request.headers):
            return request
        text = request.body.decode()
        for fake, real in self._kms_etags.items():
            text = text.replace(fake.strip('"'), real.strip('"'))
        body = text.encode()
        headers = [
            (k, v) for k, v in request.headers
            if not k.lower().startswith("x-amz-checksum")
            and k.lower() not in ("content-md5", "x-amz-sdk-checksum-algorithm", "content-length")
        ] + [("Content-Length", str(len(body)))]
        self._count(kms_rewrites=1)
        return Request(request.method, request.target, headers, body, request.received_at)

    def _kms_answer(self, request: Request, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        if request.operation == "UploadPart":
            sent = request.header("x-amz-checksum-sha256")
            for i, line in enumerate(lines):
                name, _, value = line.partition(":")
                if name.strip().lower() == "etag":
                    fake = self._opaque(value.strip())
                    with self._lock:
                        self._kms_etags[fake] = value.strip()
                        if sent:
                            self._kms_sums[self._part_of(request)] = sent
                    lines[i] = f"ETag: {fake}"
            self._count(kms_rewrites=1)
            return "\r\n".join(lines).encode("latin-1"), body
        if request.operation != "ListParts" or _get(_head_fields(lines), "Content-Length") is None:
            return head, body
        path, upload_id, _ = self._part_of(request)

        def part(match: re.Match[str]) -> str:
            block = match.group(0)
            number = re.search(r"<PartNumber>(\d+)</PartNumber>", block)
            etag = re.search(r"<ETag>([^<]*)</ETag>", block)
            if number is None or etag is None:
                return block
            real = html.unescape(etag.group(1))
            block = block.replace(etag.group(0), f"<ETag>{html.escape(self._opaque(real))}</ETag>")
            with self._lock:
                sent = self._kms_sums.get((path, upload_id, int(number.group(1))))
            if sent:
                block = block.replace("</Part>", f"<ChecksumSHA256>{sent}</ChecksumSHA256></Part>")
            return block

        text = re.sub(r"<Part>.*?</Part>", part, body.decode(), flags=re.S)
        new_body = text.encode()
        lines = [
            f"Content-Length: {len(new_body)}"
            if line.lower().startswith("content-length:") else line
            for line in lines
        ]
        self._count(kms_rewrites=1)
        return "\r\n".join(lines).encode("latin-1"), new_body

    def _strip(self, request: Request, names: tuple[str, ...]) -> Request:
        dropped = {name.lower() for name in names}
        kept = [(k, v) for k, v in request.headers if k.lower() not in dropped]
        if len(kept) == len(request.headers):
            return request
        self._count(headers_stripped=len(request.headers) - len(kept))
        return Request(request.method, request.target, kept, request.body, request.received_at)

    def _record_write(self, request: Request) -> None:
        part = 0
        for item in request.query.split("&"):
            if item.startswith("partNumber="):
                part = int(item.split("=", 1)[1])
        write = Write(
            request.operation,
            request.path,
            part,
            len(request.body),
            request.received_at,
            time.monotonic(),
        )
        with self._lock:
            self.stats.writes.append(write)

    def _read_request(self, conn: socket.socket, rfile: BinaryIO, pace: _Pacer) -> Request:
        start, headers = _read_head(rfile)
        received_at = time.monotonic()
        method, target, _version = start.decode("latin-1").split(" ", 2)
        expect = _get(headers, "Expect")
        if expect is not None and expect.lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        if _is_chunked(headers):
            body = _read_chunked(rfile, pace)
        else:
            length = int(_get(headers, "Content-Length") or 0)
            if length < 0:
                raise ValueError("negative Content-Length")
            body = _read_exact(rfile, length, pace)
        return Request(method, target, headers, body, received_at)

    def _connect(self) -> tuple[socket.socket, BinaryIO]:
        sock = socket.create_connection(self.upstream, timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, sock.makefile("rb")

    @staticmethod
    def _close_upstream(upstream: tuple[socket.socket, BinaryIO]) -> None:
        sock, rfile = upstream
        with contextlib.suppress(OSError):
            rfile.close()
        with contextlib.suppress(OSError):
            sock.close()

    def _exchange(
        self, upstream: tuple[socket.socket, BinaryIO], request: Request
    ) -> tuple[int, bytes, bytes, bool]:
        """Send the request upstream; returns (status, raw head, raw body, close after)."""
        sock, rfile = upstream
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
        while True:
            start, headers = _read_head(rfile)
            version, status_text = start.decode("latin-1").split(" ", 2)[:2]
            status = int(status_text)
            if status >= 200 or status == 101:
                break  # interim 1xx answers are dropped: the client saw our own 100
        close_after = (_get(headers, "Connection") or "").lower() == "close" or (
            version == "HTTP/1.0" and (_get(headers, "Connection") or "").lower() != "keep-alive"
        )
        if request.method == "HEAD" or status in (204, 304):
            body = b""
        elif _is_chunked(headers):
            body = _read_chunked(rfile)
        elif _get(headers, "Content-Length") is not None:
            body = _read_exact(rfile, int(_get(headers, "Content-Length") or 0))
        else:
            # Ended by close: read it all, and tell the client its length instead.
            body = rfile.read()
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            headers += [("Content-Length", str(len(body))), ("Connection", "close")]
            close_after = True
        head = [start.decode("latin-1")] + [f"{k}: {v}" for k, v in headers]
        return status, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), body, close_after

    def _answer_error(self, conn: socket.socket, request: Request, kind: str) -> None:
        status, code, message = ERRORS[kind]
        with self._lock:
            self.stats.errors += 1
            self.stats.faults_by_operation[f"{code} {request.operation}"] += 1
        body = b"" if request.method == "HEAD" else _error_body(code, message, request.path)
        reason = {500: "Internal Server Error", 501: "Not Implemented"}.get(
            status, "Service Unavailable"
        )
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amz-request-id: faultproxy\r\n\r\n"
        )
        conn.sendall(head.encode() + body)

    def _answer_custom(
        self, conn: socket.socket, request: Request, status: int,
        headers: list[tuple[str, str]], body: bytes,
    ) -> None:
        with self._lock:
            self.stats.errors += 1
            self.stats.faults_by_operation[f"{status} {request.method}"] += 1
        if request.method == "HEAD":
            body = b""
        lines = [f"HTTP/1.1 {status} Answered", *(f"{k}: {v}" for k, v in headers)]
        lines.append(f"Content-Length: {len(body)}")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    @staticmethod
    def _answer_status(conn: socket.socket, status: int) -> None:
        reasons = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}
        conn.sendall(
            f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
            "Content-Length: 0\r\nx-amz-request-id: faultproxy\r\n\r\n".encode()
        )
