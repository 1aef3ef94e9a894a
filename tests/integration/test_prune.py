"""``cacheship prune`` end to end: real worker processes, Redis and an S3 server over HTTP."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from tasks.backends.s3.prune import parse_prune_request
from tasks.request import S3Spec
from tasks.verify import verify_cache
from tests.stack import REPO, Worker
from worker.client import Client
from worker.embedded import ServerProcess
from worker.samplecache import make_layer, write_layout

KiB = 1024


def cli(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``cacheship`` from this checkout (``python -m worker.cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_cache(directory: Path, layer_seeds: list[int], size: int = 24 * KiB) -> list[str]:
    """A BuildKit local cache whose chain is the layers of ``layer_seeds``, root first.

    Two caches built with the same first seeds share those layer blobs byte for byte.
    Returns the layer digests.
    """
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layers: list[dict[str, object]] = []
    records: list[dict[str, object]] = [{"digest": "sha256:" + "0" * 64}]
    digests = []
    for i, seed in enumerate(layer_seeds):
        blob, diff_id = make_layer(size + seed % 7, seed)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        (blobs / digest.split(":")[1]).write_bytes(blob)
        digests.append(digest)
        created = f"2026-01-01T00:{i:02d}:00Z"
        layers.append(
            {
                "blob": digest,
                "parent": i - 1,
                "annotations": {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "diffID": diff_id,
                    "size": len(blob),
                    "createdAt": created,
                },
            }
        )
        step = hashlib.sha256(f"step {layer_seeds[: i + 1]}".encode()).hexdigest()
        records.append(
            {
                "digest": "sha256:" + step,
                "inputs": [[{"selector": "", "link": len(records) - 1}]],
                "layers": [{"layer": i, "createdAt": created}],
            }
        )
    write_layout(directory, {"layers": layers, "records": records})
    return digests


def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def export(client: Client, source: Path, bucket: str, name: str) -> str:
    return client.submit(
        {
            "source": {"type": "local", "src": str(source)},
            "target": {"type": "s3", "bucket": bucket, "name": name},
        }
    )


def prune_once(client: Client, request: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Enqueue the prune task as the command line does and wait for its report."""
    from worker.cli.prune import submit

    prune_id = submit(client, parse_prune_request(request).model_dump(mode="json"))
    result: AsyncResult[Any] = AsyncResult(prune_id, app=client.app)
    report: dict[str, Any] = result.get(timeout=timeout, propagate=True)
    return report


def spec(bucket: str, s3_server: ServerProcess, *names: str) -> S3Spec:
    return S3Spec(bucket=bucket, name=list(names), endpoint_url=s3_server.url, use_path_style=True)


def test_prune_by_hand_removes_garbage_and_an_expired_names_exclusive_blobs(
    env: dict[str, str],
    workers: Callable[..., Worker],
    source_root: Path,
    bucket: str,
    s3: Any,
    s3_server: ServerProcess,
) -> None:
    workers(env, name="w1", concurrency=3)
    client = Client(env["CACHESHIP_REDIS_URL"])
    main = write_cache(source_root / "main", [1, 2, 3])
    feature = write_cache(source_root / "feature", [1, 2, 4, 5])
    results = {
        name: client.wait(export(client, source_root / path, bucket, name), timeout=600)
        for name, path in (("main", "main"), ("feature-x", "feature"))
    }
    target = spec(bucket, s3_server, "main")
    junk = {target.blob_key(f"sha256:{i:064x}") for i in range(1, 13)}
    for key in junk:
        s3.put_object(Bucket=bucket, Key=key, Body=b"unreferenced")
    s3.create_multipart_upload(Bucket=bucket, Key=target.blob_key("sha256:" + "e" * 64))
    before = keys(s3, bucket)
    time.sleep(1.1)  # grace 0s on a server clock with one-second steps

    cache = f"type=s3,bucket={bucket}"
    dry = cli("prune", "--cache", cache, "--grace", "0s", "--expire-names", "0s",
              "--keep-names", "ma*", "--dry-run", "--wait", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert keys(s3, bucket) == before
    done = cli("prune", "--cache", cache, "--grace", "0s", "--expire-names", "0s",
               "--keep-names", "ma*", "--wait", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    after = keys(s3, bucket)

    assert report["state"] == "SUCCESS" and report["ok"] is True
    assert report["names_removed"] == ["feature-x"] and report["names_kept"] == ["main"]
    exclusive = {target.blob_key(d) for d in feature if d not in main}
    assert len(exclusive) == 2
    written = results["feature-x"]
    small = {written["config"], json.loads(written["cache.manifest"])["digest"]}
    assert before - after == junk | exclusive | {target.manifest_key("feature-x")} | {
        target.blob_key(d) for d in small
    }
    assert {target.blob_key(d) for d in main} <= after
    # feature-x's config and manifest blobs went with it; main's stay.
    assert report["blobs_removed"] == len(junk) + len(exclusive) + 2
    assert report["blobs_kept_referenced"] == len(main) + 2
    assert report["uploads_aborted"] == 1
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert report["bytes_freed"] > 0
    dry_report = json.loads(dry.stdout)
    for field in ("names_removed", "blobs_removed", "bytes_freed", "uploads_aborted"):
        assert dry_report[field] == report[field], field

    verified = cli("verify", "--cache", f"{cache},name=main", "--deep", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    summary = cli("prune", "--cache", cache, "--grace", "0s", "--wait", env=env)
    assert summary.returncode == 0, summary.stderr
    assert "0 removed" in summary.stdout and "names    1 kept" in summary.stdout


def test_a_corrupt_name_stops_the_prune_and_bad_input_is_refused(
    env: dict[str, str],
    workers: Callable[..., Worker],
    source_root: Path,
    bucket: str,
    s3: Any,
) -> None:
    env = {**env, "CACHESHIP_ALLOWED_BUCKETS": bucket}
    workers(env, name="w1", concurrency=2)
    client = Client(env["CACHESHIP_REDIS_URL"])
    write_cache(source_root / "app", [7, 8])
    client.wait(export(client, source_root / "app", bucket, "app"), timeout=600)
    s3.put_object(Bucket=bucket, Key="blobs/sha256:" + "1" * 64, Body=b"garbage")
    s3.put_object(Bucket=bucket, Key="manifests/broken", Body=b'{"layers":[{"blob":')
    before = keys(s3, bucket)
    time.sleep(1.1)

    refused = cli("prune", "--cache", f"type=s3,bucket={bucket}", "--grace", "0s", "--wait",
                  env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert keys(s3, bucket) == before
    error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1
    assert "nothing deleted" in error[0] and "'broken'" in error[0]
    assert "does not parse" in error[0]

    s3.create_bucket(Bucket=bucket + "-other")
    outside = cli("prune", "--cache", f"type=s3,bucket={bucket}-other", "--wait", "--json",
                  env=env)
    # The command line has the workers' list in its environment: refused at enqueue.
    assert outside.returncode == 2
    assert "cache.bucket" in outside.stderr and "CACHESHIP_ALLOWED_BUCKETS" in outside.stderr
    assert outside.stdout == ""

    malformed = cli("prune", "--cache", f"type=s3,bucket={bucket}", "--grace", "2days", env=env)
    assert malformed.returncode == 2
    assert "error: --grace: '2days' is not a duration" in malformed.stderr


def test_six_exports_sharing_layers_survive_a_pruning_loop(
    env: dict[str, str],
    workers: Callable[..., Worker],
    source_root: Path,
    bucket: str,
    s3: Any,
    s3_server: ServerProcess,
) -> None:
    """Each export shares two of its four layers with the others; prune --grace 0s loops.

    A first round leaves every blob in the bucket and then loses its names: the second
    round finds its layers already there (skipped) exactly while prune sees them
    unreferenced and deletes them. Every export must still end with names that verify.
    """
    workers(env, name="w1", concurrency=4)
    workers(env, name="w2", concurrency=3)
    client = Client(env["CACHESHIP_REDIS_URL"])
    caches = {
        f"app-{k}": write_cache(source_root / f"app-{k}", [100, 101, 200 + k, 300 + k])
        for k in range(6)
    }
    first = [export(client, source_root / name, bucket, name) for name in caches]
    for export_id in first:
        client.wait(export_id, timeout=900)
    for name in caches:
        s3.delete_object(Bucket=bucket, Key=f"manifests/{name}")
    for i in range(1, 30):
        s3.put_object(Bucket=bucket, Key=f"blobs/sha256:{i:064x}", Body=b"garbage")
    time.sleep(1.1)

    request = {"cache": {"type": "s3", "bucket": bucket}, "grace": "0s", "dry_run": False}
    stop = threading.Event()
    reports: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                reports.append(prune_once(client, request))
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    pruner = threading.Thread(target=loop)
    pruner.start()
    try:
        time.sleep(0.5)  # the first prune is listing or deleting the orphaned layers
        second = [export(client, source_root / name, bucket, name) for name in caches]
        results = [client.wait(export_id, timeout=900) for export_id in second]
    finally:
        stop.set()
        pruner.join(900)
    assert errors == []
    assert all(r["status"] == "complete" for r in results)
    assert len(reports) >= 2
    assert sum(r["blobs_removed"] for r in reports) >= 29  # the prune really collected
    for name, digests in caches.items():
        target = spec(bucket, s3_server, name)
        report = verify_cache(s3, target, deep=True)
        assert report.sound, [str(p) for p in report.problems]
        assert {b.digest for b in report.blobs} == set(digests)
    # And once the exports are done, a prune keeps every live blob.
    final = prune_once(client, request)
    assert final["names_kept"] == sorted(caches)
    for name in caches:
        assert verify_cache(s3, spec(bucket, s3_server, name), deep=True).sound


def test_celery_beat_runs_the_scheduled_prune(
    env: dict[str, str],
    workers: Callable[..., Worker],
    source_root: Path,
    bucket: str,
    s3: Any,
    s3_server: ServerProcess,
    tmp_path: Path,
) -> None:
    env = {
        **env,
        "CACHESHIP_PRUNE_SCHEDULE": "2s",
        "CACHESHIP_PRUNE_CACHE": f"type=s3,bucket={bucket}",
        "CACHESHIP_PRUNE_GRACE": "0s",
    }
    workers(env, name="w1", concurrency=2)
    client = Client(env["CACHESHIP_REDIS_URL"])
    digests = write_cache(source_root / "app", [41, 42])
    junk = {f"blobs/sha256:{i:064x}" for i in range(1, 6)}
    for key in junk:
        s3.put_object(Bucket=bucket, Key=key, Body=b"garbage")
    client.wait(export(client, source_root / "app", bucket, "app"), timeout=600)
    log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel", "INFO",
         "--schedule", str(tmp_path / "beat-schedule")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while junk & keys(s3, bucket) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        beat.terminate()
        beat.wait(30)
        log.close()
    assert not junk & keys(s3, bucket), (tmp_path / "beat.log").read_text()[-3000:]
    assert "cacheship.prune" in (tmp_path / "beat.log").read_text()
    report = verify_cache(s3, spec(bucket, s3_server, "app"), deep=True)
    assert report.sound and {b.digest for b in report.blobs} == set(digests)
