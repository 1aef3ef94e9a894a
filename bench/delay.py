"""A delay line: a TCP relay that adds a round-trip time between its clients and one server.

A real S3 region answers each request in 10-30 ms; on loopback it answers in well under one.
Every byte that passes the relay is held for half the round trip in each direction (order
kept, no bandwidth limit), and a new connection waits one round trip before its first byte
goes through, as TCP's handshake makes a client wait. Every client of the S3 server in a
benchmark run (cacheship's worker, the raw baseline, BuildKit's exporter) goes through the
same relay, so both sides of a comparison pay alike. Redis is not delayed: it sits beside the
workers.

It runs as a process of its own (``python -m bench.delay --rtt-ms 20 --target HOST:PORT``,
printing the port it listens on) so that relaying never competes with a measured process
for its interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from worker.embedded import LOOPBACK

CHUNK = 256 * 1024


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Forward what ``reader`` yields, each chunk ``delay`` seconds after it arrived."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    sender = asyncio.create_task(send())
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        if not sender.done():
            sender.cancel()


def _quiet_on_shutdown(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Connections still open when the relay stops are cancelled: not worth a traceback."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def _serve(rtt: float, target_host: str, target_port: int, port: int) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(rtt)  # the handshake's round trip
            server_r, server_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(
                _pipe(client_r, server_w, rtt / 2), _pipe(server_r, client_w, rtt / 2)
            )
        finally:
            for w in (client_w, server_w):
                with contextlib.suppress(Exception):
                    w.close()

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_on_shutdown)
    server = await asyncio.start_server(handle, LOOPBACK, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(bound, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.delay", description=__doc__)
    parser.add_argument("--rtt-ms", type=float, required=True, help="round trip to add")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    # On a busy machine a starved relay would add its own waits to the round trip it
    # models: ask for a larger share of the CPU where allowed (root), never fail for it.
    with contextlib.suppress(OSError):
        os.nice(-10)
    asyncio.run(_serve(args.rtt_ms / 1000, host, int(port), args.port))
    return 0


@dataclass
class DelayLine:
    """A running relay: ``url`` reaches the server ``rtt_ms`` further away."""

    proc: subprocess.Popen[str]
    url: str
    rtt_ms: float

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(server_url: str, rtt_ms: float) -> DelayLine:
    """Start a relay in front of ``server_url`` (``http://host:port``); returns its URL."""
    parts = urlsplit(server_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.delay", "--rtt-ms", str(rtt_ms),
         "--target", f"{parts.hostname}:{parts.port}"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the port, once it listens
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"the delay line did not start: {line!r}")
    return DelayLine(proc, f"{parts.scheme}://{LOOPBACK}:{line}", rtt_ms)


if __name__ == "__main__":
    raise SystemExit(main())
