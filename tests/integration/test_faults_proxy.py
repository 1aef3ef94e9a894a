"""The fault proxy itself: HTTP/1.1 framing relayed faithfully, faults as planned, bounded."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.faultproxy import FaultPlan, FaultProxy


class Upstream(BaseHTTPRequestHandler):
    """Answers with the sha256 of the request body: chunked for POST, sized for PUT."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self) -> None:
        digest = hashlib.sha256(self._body()).hexdigest().encode()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (digest[:20], digest[20:]):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self) -> None:
        digest = hashlib.sha256(self._body()).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(digest)))
        self.end_headers()
        self.wfile.write(digest)

    def do_HEAD(self) -> None:
        self.send_response(404 if "missing" in self.path else 200)
        self.send_header("Content-Length", "12345")
        self.end_headers()


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_framing_keep_alive_and_expect_continue_are_relayed(upstream: str) -> None:
    body = bytes(range(256)) * 4000
    want = hashlib.sha256(body).hexdigest().encode()
    with FaultProxy(upstream) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("POST", "/chunked", body=iter([body[:1000], body[1000:]]), encode_chunked=True)
        first = conn.getresponse()
        assert first.read() == want and first.getheader("Transfer-Encoding") == "chunked"
        sock = conn.sock
        conn.request("PUT", "/sized", body=body, headers={"Expect": "100-continue"})
        assert conn.getresponse().read() == want
        conn.request("HEAD", "/object")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b"" and head.getheader("Content-Length")
        assert conn.sock is sock, "one kept-alive connection for all three"
        conn.close()
        assert proxy.stats.requests == 3 and proxy.stats.bytes_up >= 2 * len(body)


def test_errors_cuts_and_head_rewrites_follow_the_plan(upstream: str) -> None:
    with FaultProxy(upstream, FaultPlan(error_rate=1.0, errors=("slowdown",))) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("PUT", "/x", body=b"data")
        answer = conn.getresponse()
        assert answer.status == 503 and b"<Code>SlowDown</Code>" in answer.read()

        proxy.plan = FaultPlan(cut_rate=1.0)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("PUT", "/x", body=b"data")
        with pytest.raises(http.client.IncompleteRead):
            conn.getresponse().read()

        proxy.plan = FaultPlan(head_missing_status=403)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("HEAD", "/missing")
        missing = conn.getresponse()
        assert missing.status == 403 and missing.read() == b""
        conn.request("HEAD", "/present")
        present = conn.getresponse()
        assert present.status == 200 and present.read() == b""
        assert (proxy.stats.errors, proxy.stats.cuts, proxy.stats.head_rewrites) == (1, 1, 1)


def test_the_proxy_stops_by_itself_after_its_request_budget(upstream: str) -> None:
    with FaultProxy(upstream, max_requests=2) as proxy:
        for _ in range(2):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("PUT", "/x", body=b"data")
            assert conn.getresponse().status == 200
            conn.close()
        proxy._acceptor.join(5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).recv(1)
