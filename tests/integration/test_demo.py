"""``cacheship demo``, the README's main job, run as a user runs it: a subprocess."""

from __future__ import annotations

import base64
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# ``python -m worker.cli`` is the console script ``cacheship``, run from this checkout.
CACHESHIP = [sys.executable, "-m", "worker.cli"]


def clean_env() -> dict[str, str]:
    """Nothing pointing at any other server: the demo brings its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CACHESHIP_", "AWS_"))}


def listening(url: str) -> bool:
    match = re.match(r"^\w+://(?:[^@/]*@)?127\.0\.0\.1:(\d+)", url)
    assert match, url
    try:
        with socket.create_connection(("127.0.0.1", int(match.group(1))), 0.5):
            return True
    except OSError:
        return False


def processes_in(root: Path) -> list[int]:
    """Processes whose working directory is (or was) the demo's temp directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(root)):
            found.append(int(entry.name))
    return found


def stack_of(output: str) -> tuple[str, str, str, Path]:
    redis_url = re.search(r"^  Redis +(\S+)", output, re.M)
    s3_url = re.search(r"^  S3 +(\S+)", output, re.M)
    flower = re.search(r"^  Flower +(\S+) +\(user \w+, password in (\S+)\)", output, re.M)
    assert redis_url and s3_url and flower, output
    return redis_url.group(1), s3_url.group(1), flower.group(1), Path(flower.group(2)).parent


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    began = time.monotonic()
    run = subprocess.run(
        [*CACHESHIP, "demo"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    took = time.monotonic() - began
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert took < 60, f"the demo took {took:.0f}s"

    redis_url, s3_url, flower_url, root = stack_of(out)
    export_id = re.search(r"^export ([0-9a-f-]{36})$", out, re.M)
    assert export_id, out
    assert f"export {export_id.group(1)}: complete in " in out
    assert "  layers    5: 5 uploaded, 0 skipped, 0 touched" in out
    assert "  name      s3://cacheship-demo/manifests/buildkit" in out
    assert "  blobs    5 of 5 present with their sizes" in out
    assert "  sha256   5 blobs read back and hashed" in out
    assert "  sound" in out
    assert f"landed:  s3://cacheship-demo/manifests/buildkit on {s3_url}" in out
    assert f"Flower:  {flower_url}/tasks  (cacheship demo --keep leaves it running)" in out
    assert (
        "docker buildx build --cache-from "
        "type=s3,region=us-east-1,bucket=cacheship-demo,name=buildkit ." in out
    )
    # live progress, as BuildKit names the steps (plain lines: stderr is not a terminal)
    assert run.stderr.count(" uploaded ") == 5
    assert "writing config sha256:" in run.stderr
    assert "writing cache manifest sha256:" in run.stderr
    assert "error" not in run.stderr.lower()

    # everything it started is gone
    assert not root.exists()
    for url in (redis_url, s3_url, flower_url):
        assert not listening(url), f"{url} still answers after the demo"
    assert processes_in(root) == []


@dataclass
class Started:
    """What a ``demo --keep`` started, seen from outside before it is told to end."""

    proc: subprocess.Popen[bytes]
    out: str
    root: Path
    urls: tuple[str, str, str]
    tree: dict[int, tuple[str, str]]  # pid -> (start time, working directory)


def descendants(pid: int) -> dict[int, tuple[str, str]]:
    """Every process below ``pid`` (the demo's servers run in sessions of their own)."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        starts[int(entry.name)] = fields[19]
    found: dict[int, tuple[str, str]] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                try:
                    cwd = os.readlink(f"/proc/{child}/cwd")
                except OSError:
                    cwd = ""
                found[child] = (starts[child], cwd)
                frontier.append(child)
    return found


def still_running(tree: dict[int, tuple[str, str]]) -> list[int]:
    """The processes of ``tree`` that still exist (same pid and start time)."""
    alive = []
    for pid, (start, _) in tree.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(pid)
    return alive


def read_until_kept(read_line: Callable[[], str]) -> str:
    """The demo's output up to the lines saying how to use the kept stack."""
    lines: list[str] = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        line = read_line()
        assert line, "".join(lines)
        lines.append(line)
        if "Ctrl-C stops it" in line:
            break
    for _ in range(3):  # `. env && cacheship status`, where local caches are read, an example
        lines.append(read_line())
    return "".join(lines)


def started(proc: subprocess.Popen[bytes], read_line: Callable[[], str]) -> Started:
    out = read_until_kept(read_line)
    redis_url, s3_url, flower_url, root = stack_of(out)
    tree = descendants(proc.pid)
    # the worker, Flower, Redis and S3 at least (the worker's pool children too)
    assert len(tree) >= 4, tree
    return Started(proc, out, root, (redis_url, s3_url, flower_url), tree)


def assert_all_gone(demo: Started) -> None:
    assert not demo.root.exists(), sorted(p.name for p in demo.root.iterdir())
    for url in demo.urls:
        assert not listening(url), f"{url} still answers after the demo"
    assert still_running(demo.tree) == [], demo.tree
    # every server's scratch directory (under the temp dir) is gone too
    tmp = Path(tempfile.gettempdir())
    left = [
        cwd for _, cwd in demo.tree.values() if cwd.startswith(str(tmp)) and Path(cwd).exists()
    ]
    assert left == []


@contextmanager
def kept_demo(stdout: int | IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [*CACHESHIP, "demo", "--keep"],
        env=clean_env(),
        stdout=stdout,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(90)


def test_demo_keep_leaves_the_stack_until_ctrl_c() -> None:
    with kept_demo(subprocess.PIPE) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        demo = started(proc, lambda: stdout.readline().decode())
        out, root = demo.out, demo.root
        redis_url, _, flower_url = demo.urls
        password = (root / "flower-password").read_text().strip()
        assert password not in out
        token = base64.b64encode(f"cacheship:{password}".encode()).decode()
        request = urllib.request.Request(
            flower_url + "/api/workers", headers={"Authorization": f"Basic {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        try:
            urllib.request.urlopen(flower_url + "/api/workers", timeout=10)
            raise AssertionError("Flower answered without credentials")
        except urllib.error.HTTPError as refused:
            assert refused.code == 401
        hint = re.search(r"^  (\. (\S+) && cacheship status ([0-9a-f-]{36}))$", out, re.M)
        assert hint and hint.group(2) == str(root / "env"), out
        assert oct((root / "env").stat().st_mode & 0o777) == "0o600"
        sources = root / "sources"
        assert f"local caches are read under {sources} (CACHESHIP_SOURCE_ROOTS)" in out
        # the env file works as printed, from a shell that has no cacheship on its PATH
        shell_env = {**clean_env(), "PATH": "/usr/bin:/bin"}
        used = subprocess.run(
            ["bash", "-c", hint.group(1) + " && echo roots=$CACHESHIP_SOURCE_ROOTS"],
            env=shell_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert used.returncode == 0, used.stderr
        assert used.stdout.startswith(f"export {hint.group(3)}: SUCCESS"), used.stdout
        assert f"roots={sources}" in used.stdout
        assert redis_url in (root / "env").read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(90)
    assert proc.returncode == 0
    assert_all_gone(demo)


def test_demo_keep_stops_everything_on_sigterm() -> None:
    with kept_demo(subprocess.PIPE) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        demo = started(proc, lambda: stdout.readline().decode())
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    assert proc.returncode == 128 + signal.SIGTERM
    assert_all_gone(demo)


def test_demo_keep_stops_everything_when_its_output_pipe_breaks() -> None:
    with kept_demo(subprocess.PIPE) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        demo = started(proc, lambda: stdout.readline().decode())
        stdout.close()  # `cacheship demo --keep | head -40` once head has had its lines
        proc.wait(90)
    assert_all_gone(demo)


def test_demo_keep_stops_everything_when_its_terminal_closes() -> None:
    """A real hang-up: the demo's controlling terminal goes away and the kernel sends SIGHUP."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*CACHESHIP, "demo", "--keep"],
        env={**clean_env(), "TERM": "xterm"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    pending = b""

    def read_line() -> str:
        nonlocal pending
        while b"\n" not in pending:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
        line, _, pending = pending.partition(b"\n")
        return line.decode(errors="replace").replace("\r", "") + "\n"

    try:
        demo = started(proc, read_line)
        os.close(master)  # the terminal window closes
        master = -1
        proc.wait(90)
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert_all_gone(demo)
