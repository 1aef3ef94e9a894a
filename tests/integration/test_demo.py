"""``cacheship demo``, the README's main job, run as a user runs it: a subprocess."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CACHESHIP = str(Path(sys.executable).with_name("cacheship"))


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
        [CACHESHIP, "demo"],
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


def test_demo_keep_leaves_the_stack_until_ctrl_c() -> None:
    proc = subprocess.Popen(
        [CACHESHIP, "demo", "--keep"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        lines.append(proc.stdout.readline())  # the `. env && cacheship status` hint
        out = "".join(lines)
        redis_url, s3_url, flower_url, root = stack_of(out)
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
        assert f"  . {root / 'env'} && cacheship status " in out
        env_file = (root / "env").read_text()
        assert "CACHESHIP_REDIS_URL=" in env_file
        assert oct((root / "env").stat().st_mode & 0o777) == "0o600"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert not root.exists()
    for url in (redis_url, s3_url, flower_url):
        assert not listening(url)
    assert processes_in(root) == []
