"""The watchdog ends exports nothing else would end, with real workers and a real Redis.

The stall timeout is small here (4 s; the default is minutes) so that each scenario takes
seconds. Messages are taken out of Redis by hand: that is exactly what a worker killed in
the instant between the queue and its unacked set, or between storing a layer's SUCCESS and
counting it in the chord, leaves behind (work that no message will ever do).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks import watchdog
from tasks.fleet.state import plan_key
from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_export import assert_sound_cache
from tests.integration.test_faults import (
    MiB,
    layer_task_id,
    local,
    open_uploads,
    proxied_env,
    target,
)
from tests.stack import Worker
from worker import internals
from worker.client import Client, ExportError
from worker.embedded import ServerProcess
from worker.samplecache import SampleCache, write_sample_cache

STALL = "4"


def drop_queued_layers(conn: redis.Redis, export_id: str, cache: SampleCache) -> int:
    """Take the export's layer messages out of the queue: lost, as if never sent."""
    ids = {layer_task_id(export_id, d.digest) for d in cache.layers}
    dropped = 0
    for name in internals.queue_lists("cacheship"):
        for raw in conn.lrange(name, 0, -1):
            if internals.message_task_id(raw) in ids:
                dropped += int(conn.lrem(name, 1, raw))
    return dropped


def dispatched(conn: redis.Redis, export_id: str) -> bool:
    return bool(conn.exists(f"cacheship-dispatched-{export_id}"))


def start_and_lose_layers(
    conn: redis.Redis, client: Client, cache: SampleCache, bucket: str
) -> tuple[str, int]:
    export_id = client.submit({"source": local(cache), "target": target(bucket)})
    deadline = time.monotonic() + 60
    while not dispatched(conn, export_id):
        assert time.monotonic() < deadline, "the export never dispatched its layers"
        time.sleep(0.05)
    time.sleep(0.3)  # every layer message published
    dropped = drop_queued_layers(conn, export_id, cache)
    assert dropped > 0, "no layer message was waiting in the queue"
    return export_id, dropped


@pytest.mark.slow
def test_layers_whose_messages_were_lost_are_sent_again_and_the_export_completes(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(source_root / "app", [1 * MiB] * 6, seed=71)
    proxy.plan = FaultPlan(bandwidth=512 * 1024)  # the one worker stays busy a while
    env = proxied_env(redis_server.url, proxy, source_root, CACHESHIP_STALL_TIMEOUT=STALL)
    worker = workers(env, name="a", concurrency=1)
    conn = redis.Redis.from_url(redis_server.url)
    export_id, dropped = start_and_lose_layers(conn, client, cache, bucket)
    began = time.monotonic()
    result = client.wait(export_id, timeout=120)
    took = time.monotonic() - began
    assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    assert open_uploads(s3, bucket) == []
    assert "layers sent again" in worker.log()
    # The layers sent again ran outside the chord: finalize came from the watchdog too.
    assert "finalize sent again" in worker.log()
    print(f"\n{dropped} lost layer messages: export complete {took:.1f}s later")


@pytest.mark.slow
def test_an_export_that_cannot_be_driven_again_fails_with_the_reason(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(source_root / "app", [1 * MiB] * 4, seed=72)
    proxy.plan = FaultPlan(bandwidth=512 * 1024)
    env = proxied_env(redis_server.url, proxy, source_root, CACHESHIP_STALL_TIMEOUT=STALL)
    workers(env, name="a", concurrency=1)
    conn = redis.Redis.from_url(redis_server.url)
    export_id, _ = start_and_lose_layers(conn, client, cache, bucket)
    conn.delete(plan_key(export_id))  # and nothing left to send them again from
    with pytest.raises(ExportError) as failed:
        client.wait(export_id, timeout=60)
    assert "plan has expired" in str(failed.value)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="manifests/").get("KeyCount", 0) == 0


def test_only_the_export_itself_starts_its_watch(redis_server: ServerProcess) -> None:
    """A layer ending after its export ended (and was forgotten) does not put it back."""
    db = redis.Redis.from_url(redis_server.url)
    watchdog.touch(db, "late-export")  # a layer's touch before the export task's start
    assert db.zscore(watchdog.ACTIVE_KEY, "late-export") is None
    watchdog.touch(db, "late-export", now=100.0, start=True)
    watchdog.touch(db, "late-export", now=200.0)  # a layer moved
    assert db.zscore(watchdog.ACTIVE_KEY, "late-export") == 200.0
    watchdog.forget(db, "late-export")  # the export ended
    watchdog.touch(db, "late-export")  # a layer still running stops after the end
    assert db.zscore(watchdog.ACTIVE_KEY, "late-export") is None


def test_redrives_count_only_while_the_export_makes_no_progress(
    redis_server: ServerProcess,
) -> None:
    db = redis.Redis.from_url(redis_server.url)
    watchdog.touch(db, "long-export", now=10.0, start=True)
    assert watchdog.count_redrive(db, "long-export", 60, now=200.0) == 1
    assert watchdog.count_redrive(db, "long-export", 60, now=400.0) == 2  # still stuck
    watchdog.touch(db, "long-export", now=450.0)  # a layer moved: a new stall counts anew
    assert watchdog.count_redrive(db, "long-export", 60, now=700.0) == 1
    assert db.zscore(watchdog.ACTIVE_KEY, "long-export") == 700.0
