"""Shared fixtures: every integration test gets its own Redis, bucket and workers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultProxy
from tests.stack import Worker, s3_client, start_worker, worker_env
from worker.client import Client
from worker.embedded import ServerProcess, start_redis, start_s3


def expected_seconds(item: pytest.Item) -> float:
    """How long a test marked ``slow`` takes, as its mark says (``slow(seconds=...)``)."""
    mark = item.get_closest_marker("slow")
    return float(mark.kwargs.get("seconds", 60)) if mark is not None else 0.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first, the longest first; the rest in their collected order.

    A parallel run (pytest-xdist, scripts/test) hands tests out in this order, one at a time
    to whichever process is free: the scenarios of several minutes start at once on separate
    processes instead of one of them starting late and keeping the whole run waiting.
    """
    items.sort(key=lambda item: -expected_seconds(item))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[ServerProcess]:
    server = start_s3()
    yield server
    server.stop()


@pytest.fixture
def redis_server() -> Iterator[ServerProcess]:
    """A fresh server per test: no message or result can leak between tests."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: ServerProcess) -> Any:
    return s3_client(s3_server.url)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"cache-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def source_root(tmp_path: Path) -> Path:
    root = tmp_path / "sources"
    root.mkdir()
    return root


@pytest.fixture
def env(redis_server: ServerProcess, s3_server: ServerProcess, source_root: Path) -> dict[str, str]:
    return worker_env(redis_server.url, s3_server.url, source_root)


@pytest.fixture
def client(redis_server: ServerProcess) -> Client:
    return Client(redis_server.url)


@pytest.fixture
def proxy(s3_server: ServerProcess) -> Iterator[FaultProxy]:
    """The S3 server behind the fault-injecting, write-recording proxy (tests/faultproxy.py)."""
    with FaultProxy(s3_server.url, seed=20260101, max_seconds=900) as running:
        yield running


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers with ``workers(env, name=..., concurrency=...)``; all stopped at the end."""
    started: list[Worker] = []

    def start(env: dict[str, str], **kwargs: Any) -> Worker:
        worker = start_worker(env, tmp_path, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
