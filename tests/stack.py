"""Real parts for integration tests: worker processes, S3 access, a sample cache.

Servers come from ``worker.embedded`` (each on a free loopback port); workers are real
``celery worker`` processes started with the environment a deployment would give them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "cacheship-test-access"
# A distinctive secret: the security tests scan logs and Redis for it.
SECRET_KEY = "S3CRET-cacheship-7f3a9c-never-log-me"


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client, as any reader of the bucket would use."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def worker_env(redis_url: str, s3_url: str, source_root: Path, **extra: str) -> dict[str, str]:
    """The environment a worker gets in production, pointed at the test servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHESHIP_", "AWS_"))}
    env.update(
        {
            "CACHESHIP_REDIS_URL": redis_url,
            "CACHESHIP_S3_ENDPOINT_URL": s3_url,
            "CACHESHIP_S3_REGION": "us-east-1",
            "CACHESHIP_S3_USE_PATH_STYLE": "true",
            "CACHESHIP_SOURCE_ROOTS": str(source_root),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a worker's pool processes), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class Worker:
    """One ``celery worker`` process (its pool children included)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _stopped: bool = field(default=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        """Signal the main process only."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_all(self) -> None:
        """SIGKILL the whole process group: the main process and every pool child."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()
        # Pool children of a killed main process are reaped with the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_worker(
    env: dict[str, str],
    log_dir: Path,
    name: str = "w1",
    concurrency: int = 2,
    extra_args: tuple[str, ...] = (),
    wait: bool = True,
) -> Worker:
    """``celery -A worker worker`` exactly as an operator would run it."""
    log_path = log_dir / f"worker-{name}.log"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
        *extra_args,
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    worker = Worker(name=name, proc=proc, log_path=log_path)
    if wait:
        worker.wait_ready()
    return worker
