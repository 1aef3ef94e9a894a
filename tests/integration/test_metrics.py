"""A real worker's /metrics, scraped over HTTP while it copies real exports."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import Worker, child_pids
from worker.client import Client, ExportError
from worker.embedded import ServerProcess, free_port
from worker.samplecache import SampleCache, write_sample_cache

MiB = 1024 * 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def client(redis_server: ServerProcess) -> Client:
    return Client(redis_server.url)


@pytest.fixture
def cache(source_root: Path) -> SampleCache:
    return write_sample_cache(source_root / "app", [3 * MiB, 1 * MiB, 200_000], seed=11)


def metrics_env(env: dict[str, str]) -> tuple[dict[str, str], int]:
    port = free_port()
    return {
        **env,
        "CACHESHIP_METRICS_PORT": str(port),
        "CACHESHIP_METRICS_ADDRESS": "127.0.0.1",
    }, port


def export(client: Client, cache: SampleCache, bucket: str) -> dict[str, Any]:
    request = {
        "source": {"type": "local", "src": str(cache.path)},
        "target": {"type": "s3", "bucket": bucket, "name": "main"},
    }
    return client.wait(client.submit(request), timeout=180)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_counters_follow_what_the_exports_did(
    pool: str,
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    bucket: str,
    cache: SampleCache,
) -> None:
    wenv, port = metrics_env(env)
    workers(wenv, concurrency=2, extra_args=("--pool", pool))
    layers = len(cache.layers)
    total = sum(d.size for d in cache.layers)

    before = scrape(port)
    assert value(before, "cacheship_exports_total", outcome="success") == 0
    assert value(before, "cacheship_layer_uploaded_bytes_total") == 0
    assert value(before, "cacheship_queue_messages", queue="cacheship") == 0
    assert value(before, "cacheship_broker_up") == 1

    first = export(client, cache, bucket)
    assert first["layers_uploaded"] == layers
    after = scrape(port)
    assert value(after, "cacheship_exports_started_total") == 1
    assert value(after, "cacheship_exports_total", outcome="success") == 1
    assert value(after, "cacheship_exports_total", outcome="failure") == 0
    assert value(after, "cacheship_export_duration_seconds_count", outcome="success") == 1
    assert value(after, "cacheship_layers_total", action="uploaded") == layers
    assert value(after, "cacheship_layer_uploaded_bytes_total") == total
    assert value(after, "cacheship_layer_skipped_bytes_total") == 0
    assert value(after, "cacheship_layer_duration_seconds_count", action="uploaded") == layers
    assert value(after, "cacheship_layers_in_flight") == 0

    again = export(client, cache, bucket)
    assert again["layers_skipped"] == layers
    warm = scrape(port)
    assert value(warm, "cacheship_exports_total", outcome="success") == 2
    assert value(warm, "cacheship_layers_total", action="skipped") == layers
    assert value(warm, "cacheship_layer_skipped_bytes_total") == total
    assert value(warm, "cacheship_layer_uploaded_bytes_total") == total  # nothing more sent
    assert value(warm, "cacheship_export_duration_seconds_count", outcome="success") == 2
    assert value(warm, "cacheship_queue_messages", queue="cacheship") == 0


def test_a_failed_export_counts_once_however_many_layers_fail(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    bucket: str,
    cache: SampleCache,
) -> None:
    for bad in cache.layers[:2]:
        path = cache.path / "blobs" / "sha256" / bad.digest.removeprefix("sha256:")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    wenv, port = metrics_env(env)
    workers(wenv, concurrency=2)

    with pytest.raises(ExportError):
        export(client, cache, bucket)
    samples = scrape(port)
    assert value(samples, "cacheship_exports_started_total") == 1
    assert value(samples, "cacheship_exports_total", outcome="failure") == 1
    assert value(samples, "cacheship_exports_total", outcome="success") == 0
    # The corrupt layers were never stored; the good one was copied unless the failure
    # cancelled it first. Either way the bytes match the layers counted.
    uploaded = value(samples, "cacheship_layers_total", action="uploaded")
    assert uploaded in (0, 1)
    sent = value(samples, "cacheship_layer_uploaded_bytes_total")
    assert sent == uploaded * cache.layers[2].size
    assert value(samples, "cacheship_layers_in_flight") == 0


def test_queue_depth_counts_the_tasks_nobody_took(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    bucket: str,
    cache: SampleCache,
) -> None:
    wenv, port = metrics_env(env)
    # This worker serves metrics for the queue but consumes another one: the tasks wait.
    workers(wenv, concurrency=1, extra_args=("--queues", "elsewhere"))
    request = {
        "source": {"type": "local", "src": str(cache.path)},
        "target": {"type": "s3", "bucket": bucket},
    }
    for _ in range(3):
        client.submit(request)
    samples = scrape(port)
    assert value(samples, "cacheship_queue_messages", queue="cacheship") == 3
    assert value(samples, "cacheship_queue_unacked_messages") == 0
    assert value(samples, "cacheship_broker_up") == 1
    assert value(samples, "cacheship_exports_started_total") == 0



def test_a_killed_pool_process_stops_counting_as_in_flight(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    bucket: str,
    source_root: Path,
) -> None:
    big = write_sample_cache(source_root / "big", [64 * MiB], seed=5)
    # Pool processes exist with the prefork pool only (the threads pool is one process).
    wenv, port = metrics_env(
        {**env, "CACHESHIP_PART_SIZE": str(5 * MiB), "CACHESHIP_POOL": "prefork"}
    )
    worker = workers(wenv, concurrency=1)
    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(big.path)},
            "target": {"type": "s3", "bucket": bucket, "upload_parallelism": 1},
        }
    )
    deadline = time.monotonic() + 120
    while value(running := scrape(port), "cacheship_layers_in_flight") != 1:
        assert time.monotonic() < deadline, "the layer copy never showed as in flight"
        time.sleep(0.05)
    # The running layer's message is held by the worker, not waiting in the queue.
    assert value(running, "cacheship_queue_unacked_messages") >= 1
    assert value(running, "cacheship_queue_messages", queue="cacheship") == 0
    (child,) = child_pids(worker.proc.pid)
    os.kill(child, signal.SIGKILL)  # mid-copy: its task is requeued and runs again

    result = client.wait(export_id, timeout=300)
    samples = scrape(port)
    assert value(samples, "cacheship_layers_in_flight") == 0
    assert value(samples, "cacheship_layers_total", action="uploaded") == 1  # the finished run
    sent = value(samples, "cacheship_layer_uploaded_bytes_total")
    assert sent == result["bytes_sent"]
    assert sent + value(samples, "cacheship_layer_skipped_bytes_total") == big.layers[0].size
