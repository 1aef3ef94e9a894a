"""Submitters need not be workers: a Valkey ACL user that can submit and watch, nothing else.

A real Valkey with the submitter user of worker/acl.py; the workers and Flower use the
default user. The submitter runs the client and the command line as a build farm would.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration.test_export import assert_sound_cache
from tests.stack import Worker, worker_env
from worker.acl import SUBMITTER_USER, submitter_rules
from worker.client import Client
from worker.embedded import LOOPBACK, ServerProcess, start_redis
from worker.samplecache import write_sample_cache

CACHESHIP = str(Path(sys.executable).with_name("cacheship"))
WORKER_PASSWORD = "worker-" + uuid.uuid4().hex
SUBMITTER_PASSWORD = "submitter-" + uuid.uuid4().hex


@pytest.fixture
def acl_redis() -> Iterator[ServerProcess]:
    server = start_redis(
        password=WORKER_PASSWORD,
        extra_args=("--user", SUBMITTER_USER, "on", f">{SUBMITTER_PASSWORD}", *submitter_rules()),
    )
    yield server
    server.stop()


def submitter_url(server: ServerProcess) -> str:
    return f"redis://{SUBMITTER_USER}:{SUBMITTER_PASSWORD}@{LOOPBACK}:{server.port}/0"


def test_a_submitter_can_submit_and_watch_and_nothing_else(
    acl_redis: ServerProcess,
    s3_server: ServerProcess,
    workers: Callable[..., Worker],
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    cache = write_sample_cache(source_root / "app", [2 * 1024 * 1024, 90_000], seed=194)
    workers(worker_env(acl_redis.url, s3_server.url, source_root), concurrency=2)
    admin = redis.Redis.from_url(acl_redis.url)
    admin.set("cacheship-lock-something", "held by a worker")

    # The client, as the submitter: submit, follow to the end, read the steps.
    client = Client(submitter_url(acl_redis))
    request = {
        "source": {"type": "local", "src": str(cache.path)},
        "target": {"type": "s3", "bucket": bucket},
    }
    export_id = client.submit(request)
    result = client.wait(export_id, timeout=90)
    assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    snap = client.snapshot(export_id)
    assert snap.state == "SUCCESS" and len(snap.steps) == len(cache.layers) + 2
    assert not client.lost(export_id)

    # The command line, as the submitter: export --wait, then status.
    env = {
        k: v for k, v in worker_env(acl_redis.url, s3_server.url, source_root).items()
        if not k.startswith("AWS_")
    }
    env["CACHESHIP_REDIS_URL"] = submitter_url(acl_redis)
    done = subprocess.run(
        [CACHESHIP, "export", "--from", f"type=local,src={cache.path}",
         "--to", f"type=s3,bucket={bucket},prefix=cli/", "--wait", "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    status = subprocess.run(
        [CACHESHIP, "status", export_id], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert status.returncode == 0 and export_id in status.stdout + status.stderr, status.stderr

    # And nothing else.
    user = redis.Redis.from_url(submitter_url(acl_redis))
    denied: list[tuple[str, Callable[[], Any]]] = [
        ("FLUSHALL", lambda: user.flushall()),
        ("FLUSHDB", lambda: user.flushdb()),
        ("DEL of another key", lambda: user.delete("cacheship-lock-something")),
        ("DEL of an export's result", lambda: user.delete(f"celery-task-meta-{export_id}")),
        ("forging a result", lambda: user.set(f"celery-task-meta-{export_id}", "{}")),
        ("publishing a state", lambda: user.publish(f"celery-task-meta-{export_id}", "x")),
        ("reading queued requests", lambda: user.lrange("cacheship", 0, -1)),
        ("taking a queued request", lambda: user.rpop("cacheship")),
        ("reading requests in flight", lambda: user.hgetall("unacked")),
        ("reading another key", lambda: user.get("cacheship-lock-something")),
        ("listing keys", lambda: user.keys("*")),
        ("scanning keys", lambda: user.scan(0)),
        ("the server's settings", lambda: user.config_get("*")),
        ("changing them", lambda: user.config_set("maxmemory", "1")),
        ("the ACL", lambda: user.acl_list()),
        ("the server's state", lambda: user.info()),
        ("other clients", lambda: user.client_list()),
        ("pushing onto another list", lambda: user.lpush("celery", "x")),
        ("shutting the server down", lambda: user.shutdown()),
    ]
    for what, attempt in denied:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(f"the submitter could do: {what}")
    assert admin.get("cacheship-lock-something") == b"held by a worker"
    assert admin.exists(f"celery-task-meta-{export_id}")
