"""Faults: an S3 that errs, cuts answers and lags; a Redis that restarts; shutdowns.

Every scenario runs real servers (Redis, the S3 server behind ``tests.faultproxy``) and real
``celery worker`` processes, and checks the bucket afterwards with a plain boto3 client that
talks to the S3 server directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tasks.cacheformat import decode_config, descriptors_from_annotations
from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_export import assert_sound_cache
from tests.stack import Worker, child_pids, s3_client, worker_env
from worker.client import Client, ExportError
from worker.embedded import ServerProcess, start_redis
from worker.samplecache import SampleCache, write_sample_cache

MiB = 1024 * 1024
PART = 5 * MiB


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def layer_task_id(export_id: str, digest: str) -> str:
    """The id the export gives the copy task of a layer (stable across re-deliveries)."""
    return str(uuid.uuid5(uuid.UUID(export_id), digest))


def local(cache: SampleCache) -> dict[str, Any]:
    return {"type": "local", "src": str(cache.path)}


def target(bucket: str, **attrs: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, **attrs}


def proxied_env(
    redis_url: str, proxy: FaultProxy, source_root: Path, **extra: str
) -> dict[str, str]:
    """A worker environment whose S3 endpoint is the fault proxy."""
    return worker_env(redis_url, proxy.url, source_root, CACHESHIP_PART_SIZE=str(PART), **extra)


# --------------------------------------------------------------------------- S3 faults


@pytest.mark.slow
def test_export_completes_through_20_percent_s3_faults_with_latency(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(
        source_root / "app", [14 * MiB, 6 * MiB, 1 * MiB, 300_000, 40_000], seed=11
    )
    proxy.plan = FaultPlan(error_rate=0.12, cut_rate=0.08, latency=(0.0, 0.05))
    env = proxied_env(redis_server.url, proxy, source_root, CACHESHIP_S3_MAX_ATTEMPTS="3")
    workers(env, name="a", concurrency=2)
    workers(env, name="b", concurrency=2)

    names = ["main", "pr-7"]
    first = client.wait(
        client.submit({"source": local(cache), "target": target(bucket, name=names)}),
        timeout=240,
        interval=0.2,
    )
    assert first["status"] == "complete"
    written = assert_sound_cache(s3, bucket, first, cache, names)

    # The same cache copied S3 → S3: half the blob reads are cut mid-body as well.
    proxy.plan = FaultPlan(
        error_rate=0.1,
        cut_rate=0.5,
        latency=(0.0, 0.05),
        match=lambda request: request.operation == "GetObject",
    )
    copied = client.wait(
        client.submit(
            {
                "source": target(bucket, name=names),
                "target": target(bucket, name=names, prefix="mirror/"),
            }
        ),
        timeout=240,
        interval=0.2,
    )
    assert assert_sound_cache(s3, bucket, copied, cache, names, prefix="mirror/") == written
    assert open_uploads(s3, bucket) == []
    stats = proxy.stats
    print(f"\n20% faults: {stats.summary()}; {dict(stats.faults_by_operation)}")
    assert stats.errors + stats.cuts >= 5, "faults were really injected"
    assert stats.requests > 50


@pytest.mark.slow
def test_export_fails_cleanly_within_its_retry_budget_when_s3_always_fails(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(source_root / "app", [6 * MiB, 200_000], seed=12)
    proxy.plan = FaultPlan(error_rate=1.0)
    env = proxied_env(
        redis_server.url,
        proxy,
        source_root,
        CACHESHIP_S3_MAX_ATTEMPTS="2",
        CACHESHIP_COPY_MAX_RETRIES="2",
    )
    workers(env, concurrency=2)
    started = time.monotonic()
    export_id = client.submit({"source": local(cache), "target": target(bucket)})
    with pytest.raises(ExportError) as failure:
        client.wait(export_id, timeout=120, interval=0.2)
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert any(f"writing layer {d.digest}" in message for d in cache.layers), message
    assert "gave up after 2 retries" in message
    # Two tries of the task budget (each at most 2 * 2**n s of backoff) plus S3 attempts.
    assert elapsed < 60
    snap = client.snapshot(export_id)
    assert snap.state == "FAILURE"
    assert keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []
    # Every layer task ends (none is left retrying for ever): failed, or revoked by the
    # export's failure while it waited for its next try.
    layer_ids = [layer_task_id(export_id, d.digest) for d in cache.layers]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {client.app.AsyncResult(tid).state for tid in layer_ids}
        if states <= {"FAILURE", "REVOKED"}:
            break
        time.sleep(0.2)
    assert states <= {"FAILURE", "REVOKED"} and "FAILURE" in states, states
    print(f"\n100% faults: failed after {elapsed:.1f}s; {proxy.stats.summary()}")


# --------------------------------------------------------------------------- helpers for kills


class NameWatcher(threading.Thread):
    """Polls the bucket while an export runs: every name must point at stored blobs only.

    A name (``manifests/<name>``) that exists is read and every layer its config lists is
    HEADed; a missing blob or one of the wrong size is a violation.
    """

    def __init__(self, s3_url: str, bucket: str, prefix: str = "") -> None:
        super().__init__(daemon=True)
        self.s3 = s3_client(s3_url)
        self.bucket, self.prefix = bucket, prefix
        self.sweeps = 0
        self.names_read = 0
        self.blobs_checked = 0
        self.violations: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sweep()
            self._stop_event.wait(0.1)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)
        self.sweep()  # and once more, at the end

    def sweep(self) -> None:
        self.sweeps += 1
        for key in keys(self.s3, self.bucket, f"{self.prefix}manifests/"):
            try:
                body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError:
                continue  # listed, then gone: names are never deleted, but be lenient
            self.names_read += 1
            for digest, desc in descriptors_from_annotations(decode_config(body)).items():
                self.blobs_checked += 1
                blob = f"{self.prefix}blobs/{digest}"
                try:
                    size = self.s3.head_object(Bucket=self.bucket, Key=blob)["ContentLength"]
                except ClientError as exc:
                    self.violations.append(f"{key} → {blob}: {exc}")
                    continue
                if size != desc.size:
                    self.violations.append(f"{key} → {blob}: {size} bytes, not {desc.size}")


def busy_layers(client: Client, export_id: str, cache: SampleCache) -> list[tuple[str, str, int]]:
    """(worker hostname, digest, bytes done) of every layer being copied right now."""
    busy = []
    for layer in cache.layers:
        meta = client.app.backend.get_task_meta(layer_task_id(export_id, layer.digest))
        info = meta.get("result")
        if meta.get("status") != "PROGRESS" or not isinstance(info, dict):
            continue
        done = int(info.get("bytes_done", 0))
        if 0 < done < layer.size and meta.get("worker"):
            busy.append((str(meta["worker"]), layer.digest, done))
    return busy


def stored_parts(s3: Any, bucket: str, key: str) -> int:
    uploads = [u for u in open_uploads(s3, bucket) if u["Key"] == key]
    return sum(
        len(s3.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
        for u in uploads
    )


# --------------------------------------------------------------------------- worker deaths


@pytest.mark.slow(seconds=175)
def test_export_survives_repeated_sigkills_in_the_middle_of_large_layers(
    redis_server: ServerProcess,
    s3_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(
        source_root / "big",
        [96 * MiB, 64 * MiB, 32 * MiB, 16 * MiB, 4 * MiB, 150_000],
        seed=21,
    )
    proxy.plan = FaultPlan(bandwidth=int(1.5 * MiB))  # per connection: copies take a while
    env = proxied_env(
        redis_server.url,
        proxy,
        source_root,
        CACHESHIP_VISIBILITY_TIMEOUT="10",
        CACHESHIP_PROGRESS_INTERVAL="0.2",
    )
    alive: dict[str, Worker] = {}
    serial = 0

    def start_one() -> None:
        nonlocal serial
        serial += 1
        worker = workers(env, name=f"k{serial}", concurrency=1)
        alive[worker.name] = worker

    start_one()
    start_one()
    names = ["main", "ci"]
    # The names already point at an older cache: the watcher checks them all along.
    older = write_sample_cache(source_root / "older", [1 * MiB, 200_000], seed=20)
    client.wait(
        client.submit({"source": local(older), "target": target(bucket, name=names)}),
        timeout=60,
        interval=0.2,
    )
    watcher = NameWatcher(s3_server.url, bucket)
    watcher.start()
    export_id = client.submit(
        {"source": local(cache), "target": target(bucket, name=names, upload_parallelism=2)}
    )

    rng = random.Random(4242)
    wanted_kills = 12
    kills: list[str] = []
    deadline = time.monotonic() + 420
    try:
        while len(kills) < wanted_kills and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.6, 1.8))
            if client.snapshot(export_id, with_steps=False).ready:
                break
            busy = [b for b in busy_layers(client, export_id, cache) if b[0].split("@")[0] in alive]
            if not busy:
                continue
            hostname, digest, done = rng.choice(busy)
            worker = alive[hostname.split("@")[0]]
            children = child_pids(worker.proc.pid)  # none with the (default) threads pool
            if rng.random() < 0.3 or not children:
                worker.kill_all()  # the whole worker: its message waits for the timeout
                del alive[worker.name]
                kills.append(f"worker {worker.name} at {digest[7:19]}+{done}")
                start_one()
            else:
                os.kill(rng.choice(children), signal.SIGKILL)  # requeued at once
                kills.append(f"child of {worker.name} at {digest[7:19]}+{done}")
        result = client.wait(
            export_id, timeout=max(30.0, deadline - time.monotonic()), interval=0.2
        )
    finally:
        watcher.stop()
        proxy.plan = FaultPlan()  # duplicates still copying finish fast, workers stop fast

    assert len(kills) >= 10, f"only {len(kills)} kills landed before the export ended: {kills}"
    assert result["status"] == "complete"
    assert_sound_cache(s3, bucket, result, cache, names)
    assert open_uploads(s3, bucket) == [], "no multipart upload is left open"
    assert watcher.violations == []
    assert watcher.names_read > 0 and watcher.blobs_checked > 0
    whole = sum(k.startswith("worker") for k in kills)
    print(
        f"\nkills: {len(kills)} ({whole} whole workers, {len(kills) - whole} pool children); "
        f"watcher: {watcher.sweeps} sweeps, {watcher.names_read} names read, "
        f"{watcher.blobs_checked} blob references checked; bytes sent {result['bytes_sent']}, "
        f"resumed {result['bytes_resumed']} of {result['bytes_total']}"
    )


@pytest.mark.slow
def test_half_uploaded_layer_resumes_from_its_stored_parts_after_the_worker_dies(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(source_root / "one", [40 * MiB], seed=22)
    layer = cache.layers[0]
    key = f"blobs/{layer.digest}"
    proxy.plan = FaultPlan(bandwidth=3 * MiB)
    env = proxied_env(redis_server.url, proxy, source_root, CACHESHIP_VISIBILITY_TIMEOUT="10")
    first = workers(env, name="first", concurrency=1)
    export_id = client.submit(
        {"source": local(cache), "target": target(bucket, upload_parallelism=1)}
    )
    deadline = time.monotonic() + 60
    while stored_parts(s3, bucket, key) < 3:
        assert time.monotonic() < deadline, "the upload never got three parts in"
        time.sleep(0.1)
    first.kill_all()
    time.sleep(1.0)  # a part the proxy had fully received still lands: count it too
    parts_before = stored_parts(s3, bucket, key)
    proxy.plan = FaultPlan()  # full speed for the rest
    workers(env, name="second", concurrency=1)
    result = client.wait(export_id, timeout=90, interval=0.2)

    assert result["layers_uploaded"] == 1
    assert result["bytes_resumed"] == parts_before * PART
    assert result["bytes_sent"] == layer.size - parts_before * PART
    assert result["bytes_sent"] + result["bytes_resumed"] == layer.size
    assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    assert open_uploads(s3, bucket) == []
    print(
        f"\nresume: {parts_before} parts stored before the kill; re-sent "
        f"{result['bytes_sent']} of {layer.size} bytes, resumed {result['bytes_resumed']}"
    )


@pytest.mark.slow
def test_warm_shutdown_while_copying_finishes_or_requeues_and_another_worker_completes(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(source_root / "app", [20 * MiB, 8 * MiB, 2 * MiB, 100_000], seed=23)
    proxy.plan = FaultPlan(bandwidth=4 * MiB)
    env = proxied_env(redis_server.url, proxy, source_root, CACHESHIP_PROGRESS_INTERVAL="0.2")
    leaving = workers(env, name="leaving", concurrency=1)
    export_id = client.submit(
        {"source": local(cache), "target": target(bucket, upload_parallelism=1)}
    )
    deadline = time.monotonic() + 60
    busy: list[tuple[str, str, int]] = []
    while not busy:
        assert time.monotonic() < deadline, "no layer was ever being copied"
        busy = busy_layers(client, export_id, cache)
        time.sleep(0.05)
    _, digest, done = busy[0]
    leaving.signal(signal.SIGTERM)
    staying = workers(env, name="staying", concurrency=1)
    assert leaving.proc.wait(90) == 0, leaving.log()[-3000:]
    result = client.wait(export_id, timeout=90, interval=0.2)

    assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    assert open_uploads(s3, bucket) == []
    running = client.app.backend.get_task_meta(layer_task_id(export_id, digest))
    assert running["status"] == "SUCCESS"
    finished_by = str(running.get("worker", ""))
    assert finished_by.startswith(("leaving@", "staying@"))
    assert "staying@" in "".join(
        str(client.app.backend.get_task_meta(layer_task_id(export_id, d.digest)).get("worker"))
        for d in cache.layers
    ), "the other worker took over the rest"
    assert "succeeded" in staying.log()
    print(
        f"\nwarm shutdown at {done} of the layer's bytes; it was finished by {finished_by}; "
        f"the leaving worker exited with 0"
    )


@pytest.mark.slow
def test_two_overlapping_exports_to_one_bucket_both_complete_sharing_blobs(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    shared = [16 * MiB, 8 * MiB, 3 * MiB]
    one = write_sample_cache(source_root / "one", [*shared, 1 * MiB], seed=31)
    two = write_sample_cache(source_root / "two", [*shared, 2 * MiB, 500_000], seed=31)
    common = {d.digest for d in one.layers} & {d.digest for d in two.layers}
    assert len(common) == len(shared)
    proxy.plan = FaultPlan(bandwidth=6 * MiB, latency=(0.0, 0.02))
    env = proxied_env(redis_server.url, proxy, source_root)
    workers(env, name="a", concurrency=2)
    workers(env, name="b", concurrency=2)

    first = client.submit({"source": local(one), "target": target(bucket, name="one")})
    second = client.submit({"source": local(two), "target": target(bucket, name="two")})
    results = [client.wait(i, timeout=120, interval=0.2) for i in (first, second)]

    assert_sound_cache(s3, bucket, results[0], one, ["one"])
    assert_sound_cache(s3, bucket, results[1], two, ["two"])
    layer_digests = {d.digest for d in one.layers} | {d.digest for d in two.layers}
    small = set()
    for result in results:
        small.add(result["config"])
        small.add(json.loads(result["cache.manifest"])["digest"])
    assert keys(s3, bucket) == sorted(
        [f"blobs/{d}" for d in layer_digests | small] + ["manifests/one", "manifests/two"]
    ), "every blob is stored once, under its digest, and nothing else"
    assert open_uploads(s3, bucket) == []
    for digest in common:
        body = s3.get_object(Bucket=bucket, Key=f"blobs/{digest}")["Body"].read()
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    total = sum(d.size for d in one.layers) + sum(d.size for d in two.layers)
    sent = sum(r["bytes_sent"] for r in results)
    print(
        f"\noverlap: {len(common)} shared blobs; bytes sent by both {sent} of {total} "
        f"requested ({sum(r['layers_skipped'] for r in results)} layers skipped)"
    )


# --------------------------------------------------------------------------- Redis restarts


def restart_redis(server: ServerProcess, *extra_args: str) -> ServerProcess:
    """Stop the server process and start a new one on the same port."""
    server.stop()
    return start_redis(port=server.port, extra_args=extra_args)


class Supervisor:
    """Restarts a worker whose process exited, as Kubernetes restarts a container."""

    def __init__(self, start: Callable[[str], Worker], names: list[str]) -> None:
        self.start = start
        self.running = [start(name) for name in names]
        self.exited: list[Worker] = []
        self.restarts = 0

    def check(self) -> None:
        for index, worker in enumerate(self.running):
            if worker.proc.poll() is not None:
                self.restarts += 1
                self.exited.append(worker)
                self.running[index] = self.start(f"{worker.name}-r{self.restarts}")

    def logs(self) -> str:
        """Every worker's log, those that exited included."""
        return "".join(w.log() for w in [*self.exited, *self.running])


def wait_supervised(
    client: Client, export_id: str, supervisor: Supervisor, timeout: float
) -> dict[str, Any]:
    """Client.wait, restarting dead workers every few seconds meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        supervisor.check()
        try:
            return client.wait(export_id, timeout=5, interval=0.2)
        except TimeoutError:
            assert time.monotonic() < deadline, f"export {export_id} hangs"


@pytest.mark.slow
def test_redis_restart_with_persistence_during_an_export_completes(
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    data = tmp_path / "redis-data"
    data.mkdir()
    durable = ("--dir", str(data), "--appendonly", "yes", "--appendfsync", "always")
    redis = start_redis(extra_args=durable)
    try:
        cache = write_sample_cache(
            source_root / "app", [24 * MiB, 12 * MiB, 4 * MiB, 300_000], seed=41
        )
        proxy.plan = FaultPlan(bandwidth=4 * MiB)
        env = proxied_env(
            redis.url,
            proxy,
            source_root,
            CACHESHIP_PROGRESS_INTERVAL="0.2",
            CACHESHIP_VISIBILITY_TIMEOUT="10",
        )
        supervisor = Supervisor(lambda name: workers(env, name=name, concurrency=2), ["a", "b"])
        client = Client(redis.url)
        export_id = client.submit(
            {"source": local(cache), "target": target(bucket, upload_parallelism=2)}
        )
        deadline = time.monotonic() + 60
        while not busy_layers(client, export_id, cache):
            assert time.monotonic() < deadline, "no layer was ever being copied"
            time.sleep(0.05)
        redis = restart_redis(redis, *durable)
        result = wait_supervised(client, export_id, supervisor, timeout=120)
        assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
        assert open_uploads(s3, bucket) == []
        assert "Connection to broker lost" in supervisor.logs()
        # The workers keep serving after the restart.
        again = wait_supervised(
            client,
            client.submit({"source": local(cache), "target": target(bucket, name="again")}),
            supervisor,
            timeout=60,
        )
        assert again["layers_skipped"] == len(cache.layers)
        print(f"\nRedis restarted (data kept): complete; {supervisor.restarts} worker restarts")
    finally:
        redis.stop()


@pytest.mark.slow
def test_redis_restart_that_loses_its_data_fails_the_export_clearly_and_never_hangs(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    cache = write_sample_cache(source_root / "app", [24 * MiB, 12 * MiB, 4 * MiB, 300_000], seed=42)
    proxy.plan = FaultPlan(bandwidth=4 * MiB)
    env = proxied_env(
        redis_server.url,
        proxy,
        source_root,
        CACHESHIP_PROGRESS_INTERVAL="0.2",
        CACHESHIP_VISIBILITY_TIMEOUT="10",
    )
    supervisor = Supervisor(lambda name: workers(env, name=name, concurrency=2), ["a"])
    export_id = client.submit(
        {"source": local(cache), "target": target(bucket, upload_parallelism=2)}
    )
    deadline = time.monotonic() + 60
    while not busy_layers(client, export_id, cache):
        assert time.monotonic() < deadline, "no layer was ever being copied"
        time.sleep(0.05)
    fresh = restart_redis(redis_server)  # no persistence: queue, plan and results are gone
    try:
        started = time.monotonic()
        with pytest.raises(ExportError) as lost:
            wait_supervised(client, export_id, supervisor, timeout=60)
        assert export_id in str(lost.value) and "no record" in str(lost.value)
        assert time.monotonic() - started < 30
        # No name was written for the lost export; the workers serve new exports.
        assert keys(s3, bucket, "manifests/") == []
        result = wait_supervised(
            client,
            client.submit({"source": local(cache), "target": target(bucket)}),
            supervisor,
            timeout=90,
        )
        assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
        assert open_uploads(s3, bucket) == []
        print(f"\nRedis restarted (data lost): {lost.value}")
    finally:
        fresh.stop()
