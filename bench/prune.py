"""Scenario 7: prune a bucket of many blobs and names against a raw boto3 list + delete.

The bucket holds ``names`` names of three layers each, spread over ``NAME_PREFIXES``
manifests prefixes (teams sharing one blobs prefix: the cache's own ``manifests/`` and
``team-1/`` ... ``team-9/``), and ``blobs`` blobs in all; every other blob is unreferenced.
cacheship runs ``cacheship.prune`` (grace 0s) on its worker: list the whole bucket, read
every object outside the blobs prefix in parallel (the names under every prefix),
DeleteObjects 1,000 keys a request with the registry rechecked before each batch. The
baseline lists the same prefix and deletes the same unreferenced keys with DeleteObjects,
1,000 a request: the floor any collector pays. Both sides get an identical, freshly
seeded prefix per run (seeding is not timed).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from celery.result import AsyncResult

from bench.stack import drop_prefix, new_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from bench.scenarios import Context, Row

LAYERS_PER_NAME = 3
#: Manifests prefixes the names are spread over (one is the cache's own ``manifests/``).
NAME_PREFIXES = 10
_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(i: int) -> str:
    return f"sha256:{i:064x}"


def _name_config(first: int) -> bytes:
    """A valid S3 cache config over three consecutive blobs (a chain of three steps)."""
    layers, records = [], []
    for n in range(LAYERS_PER_NAME):
        layers.append(
            {
                "blob": _digest(first + n),
                "parent": n - 1,
                "annotations": {
                    "mediaType": _LAYER,
                    "diffID": _digest(10**9 + first + n),
                    "size": 1,
                    "createdAt": "2026-01-01T00:00:00Z",
                },
            }
        )
        record: dict[str, Any] = {"digest": _digest(2 * 10**9 + first + n),
                                  "layers": [{"layer": n}]}
        if n:
            record["inputs"] = [[{"selector": "", "link": n - 1}]]
        records.append(record)
    return json.dumps({"layers": layers, "records": records}).encode()


def name_prefix(n: int) -> str:
    """Where name ``n`` lives: the cache's own manifests prefix, or one of nine others."""
    team = n % NAME_PREFIXES
    return "manifests/" if team == 0 else f"team-{team}/"


def seed(client: S3Client, bucket: str, prefix: str, blobs: int, names: int) -> list[str]:
    """Write the bucket; returns the keys of the unreferenced blobs."""
    referenced = names * LAYERS_PER_NAME
    if referenced > blobs:
        raise ValueError(f"prune scenario: {names} names need at least {referenced} blobs")

    def put_blob(i: int) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}blobs/{_digest(i + 1)}", Body=b"x")

    def put_name(n: int) -> None:
        body = _name_config(1 + n * LAYERS_PER_NAME)
        client.put_object(Bucket=bucket, Key=f"{prefix}{name_prefix(n)}name-{n:05d}", Body=body)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(put_blob, range(blobs)))
        list(pool.map(put_name, range(names)))
    return [f"{prefix}blobs/{_digest(i + 1)}" for i in range(referenced, blobs)]


def baseline(client: S3Client, bucket: str, prefix: str, garbage: list[str]) -> float:
    """List the prefix, then DeleteObjects the unreferenced keys 1,000 a request."""
    started = time.perf_counter()
    listed = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        listed += len(page.get("Contents", []))
    for start in range(0, len(garbage), 1000):
        chunk = [{"Key": key} for key in garbage[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})  # type: ignore[typeddict-item]
    seconds = time.perf_counter() - started
    if listed < len(garbage):
        raise RuntimeError("prune baseline: the listing missed keys")
    return seconds


def cacheship_prune(ctx: Context, bucket: str, prefix: str) -> tuple[float, dict[str, Any]]:
    """Enqueue ``cacheship.prune`` as the command line does; seconds to its report."""
    from worker.cli.prune import submit

    client = ctx.cacheship.client
    assert client is not None
    request = {
        "cache": {"type": "s3", "bucket": bucket, "prefix": prefix},
        "grace": 0.0,
        "expire_names": None,
        "keep_names": [],
        "dry_run": False,
    }
    started = time.perf_counter()
    prune_id = submit(client, request)
    report: dict[str, Any] = AsyncResult(prune_id, app=client.app).get(
        timeout=3600, interval=0.01
    )
    return time.perf_counter() - started, report


def prune(ctx: Context) -> list[Row]:
    from bench.scenarios import Row, _cpu_note, _median, _paired, _ratio

    blobs, names = ctx.sizes.prune
    garbage_count = blobs - names * LAYERS_PER_NAME
    reports: list[dict[str, Any]] = []

    def prepared(bucket: str) -> tuple[str, list[str]]:
        prefix = new_prefix("prune")
        started = time.perf_counter()
        garbage = seed(ctx.s3, bucket, prefix, blobs, names)
        ctx.log(f"  seeded {blobs} blobs, {names} names in {time.perf_counter() - started:.1f}s")
        time.sleep(1.1)  # grace 0s on a server clock of one-second steps
        return prefix, garbage

    def ours() -> float:
        prefix, _ = prepared(ctx.ours)
        try:
            seconds, report = cacheship_prune(ctx, ctx.ours, prefix)
        finally:
            drop_prefix(ctx.s3, ctx.ours, prefix)
        found = len(report["names_kept"]) + len(report["roots_elsewhere"])
        if report["blobs_removed"] != garbage_count or found != names:
            raise RuntimeError(f"prune scenario: unexpected report {report}")
        reports.append(report)
        return seconds

    def theirs() -> float:
        prefix, garbage = prepared(ctx.theirs)
        try:
            return baseline(ctx.s3, ctx.theirs, prefix, garbage)
        finally:
            drop_prefix(ctx.s3, ctx.theirs, prefix)

    name = f"7 prune {blobs} blobs, {names} names"
    a, b, cpu = _paired(ctx, name, ours, theirs)
    ratio = _ratio(_median(a), _median(b))
    return [
        Row(
            scenario=name,
            unit="s",
            cacheship=_median(a),
            baseline=_median(b),
            ratio=ratio,
            target="report only",
            passed=None,
            notes=(
                f"{garbage_count} blobs deleted per run; names over {NAME_PREFIXES} "
                "prefixes, found by listing the whole bucket; baseline = list + "
                "DeleteObjects of the same keys, no name read; " + _cpu_note(cpu)
            ),
            detail={"cacheship_runs": a, "baseline_runs": b, "cpu_seconds": cpu,
                    "report": reports[-1] if reports else None},
        )
    ]
