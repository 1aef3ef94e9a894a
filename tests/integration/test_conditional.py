"""Conditional writes are proven before a merge relies on them (``tasks.backends.s3.conditional``).

A real S3 server (moto, which checks If-Match / If-None-Match) and the fault relay in front
of it dropping those headers, as a store or proxy that ignores them does: the write goes
through and looks checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.backends.s3.conditional import conditional_support, probe
from tasks.backends.s3.names import write_name
from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_names import (
    BASE_KEY,
    _export,
    _keys_of,
    _own_keys,
    _race,
    _stored,
    _target,
    redis_client,
)
from tests.stack import Worker, s3_client
from worker.client import Client
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache

__all__ = ["redis_client"]  # the fixture, shared with test_names

STRIP = FaultPlan(strip_headers=("If-Match", "If-None-Match"))


def _keys(s3: Any, bucket: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def test_a_store_that_checks_conditions_passes_the_probe_and_it_leaves_nothing(
    s3: Any, bucket: str
) -> None:
    support = probe(s3, bucket, "blobs/cacheship-conditional-write-probe-test")
    assert support.honoured, support.detail
    assert _keys(s3, bucket) == set()


def test_a_relay_that_drops_the_conditions_is_found_out_once_per_bucket(
    s3_server: ServerProcess, bucket: str
) -> None:
    with FaultProxy(s3_server.url, STRIP, max_seconds=300) as proxy:
        s3 = s3_client(proxy.url)
        support = conditional_support(s3, bucket, "blobs/")
        assert not support.honoured
        assert "ignores conditional writes" in support.detail
        assert "If-None-Match" in support.detail
        puts = proxy.stats.operations["PutObject"]
        stripped = proxy.stats.headers_stripped
        assert stripped >= 1
        # Cached per endpoint and bucket: asking again sends nothing.
        assert conditional_support(s3, bucket, "blobs/") == support
        assert proxy.stats.operations["PutObject"] == puts
    assert _keys(s3_client(s3_server.url), bucket) == set()


def test_merges_behind_a_relay_that_drops_the_conditions_run_under_the_lock_and_say_so(
    s3_server: ServerProcess, bucket: str, redis_client: Any
) -> None:
    with FaultProxy(s3_server.url, STRIP, max_seconds=600) as proxy:
        s3 = s3_client(proxy.url)
        count = 5
        exports = [_export(s3, bucket, n) for n in range(count)]
        target = _target(bucket)
        writes = _race(count, lambda i: write_name(s3, redis_client, target, "main", exports[i]))
    assert _keys_of(_stored(s3_client(s3_server.url), bucket)) == _own_keys(count) | {BASE_KEY}
    for write in writes:
        assert write.conditional is False
        assert write.to_json()["guard"] == "fleet lock only"
        assert "ignores conditional writes" in write.note


def test_an_export_merging_behind_such_a_relay_says_so_in_its_result(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3_server: ServerProcess,
    bucket: str,
    source_root: Path,
) -> None:
    with FaultProxy(s3_server.url, STRIP, max_seconds=600) as proxy:
        workers({**env, "CACHESHIP_S3_ENDPOINT_URL": proxy.url}, name="behind-relay")
        target = {"type": "s3", "bucket": bucket, "name": "main", "merge": True}
        results = []
        for n in range(2):
            cache = write_sample_cache(source_root / f"build-{n}", [40_000, 30_000], seed=7 + n)
            export_id = client.submit(
                {"source": {"type": "local", "src": str(cache.path)}, "target": target}
            )
            results.append(client.wait(export_id, timeout=600))
        assert proxy.stats.headers_stripped >= 1
    for result in results:
        merged = result["merged"][0]
        assert merged["conditional"] is False and merged["guard"] == "fleet lock only"
        assert "ignores conditional writes" in merged["note"]
    assert results[1]["merged"][0]["records_existing"] > 0
