"""cacheship against what BuildKit's own S3 exporter does, and cacheship's fixed costs.

The BuildKit-equivalent baseline is a raw boto3 client doing what ``--cache-to type=s3``
does: HEAD every layer blob, upload the missing ones (``PARALLEL`` at a time; blobs above
the part size as multipart uploads, as BuildKit's S3 upload manager does), then PUT the
cache config under the cache's name. No verification, no progress, no bookkeeping.

The fixed-cost rows time what a build farm sees: ``cacheship export`` without ``--wait``
as a fresh process (the command line's start, validation, enqueue), and the way from
enqueue to the final result of a 4-layer export whose layers are all in the bucket already
(a warm worker: broker hops, the chord, finalize, the result's publication).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from boto3.s3.transfer import create_transfer_manager
from botocore.exceptions import ClientError

from bench.data import BenchCache
from bench.scenarios import Context, Row, _cpu_note, _median, _paired, _ratio
from bench.stack import drop_prefix, new_prefix, transfer_config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1024
MiB = 1024 * KiB
#: Blobs BuildKit's exporter uploads at once (what the comparison was measured with, -c 4).
PARALLEL = 4
REPO = Path(__file__).resolve().parents[1]


def cache_config(cache: BenchCache) -> bytes:
    """The cache config of a local cache (what BuildKit writes under ``manifests/<name>``)."""
    index = json.loads((cache.path / "index.json").read_text())
    manifest = json.loads(cache.blob_path(index["manifests"][0]["digest"]).read_bytes())
    config = manifest.get("config") or next(
        m for m in manifest["manifests"] if "cacheconfig" in m["mediaType"]
    )
    return cache.blob_path(config["digest"]).read_bytes()


def buildkit_export(
    client: S3Client, bucket: str, prefix: str, cache: BenchCache, part_size: int
) -> tuple[float, int]:
    """HEAD every blob, upload the missing ones, PUT the name; (seconds, blobs uploaded)."""
    config = transfer_config(part_size, PARALLEL)
    body = cache_config(cache)
    started = time.perf_counter()
    with create_transfer_manager(client, config) as manager:

        def one(digest: str) -> int:
            key = f"{prefix}blobs/{digest}"
            try:
                client.head_object(Bucket=bucket, Key=key)
                return 0
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                    raise
            manager.upload(str(cache.blob_path(digest)), bucket, key).result()
            return 1

        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            uploaded = sum(pool.map(one, [d.digest for d in cache.layers]))
    client.put_object(Bucket=bucket, Key=f"{prefix}manifests/buildkit", Body=body)
    return time.perf_counter() - started, uploaded


def _sizes(ctx: Context) -> tuple[tuple[int, int], tuple[int, int]]:
    """(count, size) of the big and the small cache: the sizes the request was measured at."""
    if ctx.sizes.smoke:
        return (2, 6 * MiB), (12, 64 * KiB)
    return (4, 48 * MiB), (200, 64 * KiB)


def against_buildkit(ctx: Context) -> list[Row]:
    """Empty bucket and every blob present, for big and for small layers."""
    big, small = _sizes(ctx)
    rows = []
    for label, (count, size) in (("big", big), ("small", small)):
        unit = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
        cache = ctx.cache(f"bk-{label}", [size] * count)
        rows.append(_empty(ctx, f"9 vs BuildKit: {label} {count}x{unit}, empty bucket", cache))
        rows.append(_present(ctx, f"9 vs BuildKit: {label} {count}x{unit}, all present", cache))
    return rows


def _row(name: str, a: list[float], b: list[float], cpu: dict[str, dict[str, float]]) -> Row:
    ratio = _ratio(_median(a), _median(b))
    return Row(
        scenario=name,
        unit="s",
        cacheship=_median(a),
        baseline=_median(b),
        ratio=ratio,
        target="<= 1.00",
        passed=ratio is not None and ratio <= 1.0,
        notes="baseline: HEAD every blob, upload the missing 4 at a time, PUT the name; "
        + _cpu_note(cpu),
        detail={"cacheship_runs": a, "baseline_runs": b, "cpu_seconds": cpu},
    )


def _empty(ctx: Context, name: str, cache: BenchCache) -> Row:
    def ours() -> float:
        prefix = new_prefix("cs")
        try:
            seconds, result = ctx.export(cache, prefix)
        finally:
            drop_prefix(ctx.s3, ctx.ours, prefix)
        if result.get("layers_uploaded") != len(cache.layers):
            raise RuntimeError(f"{name}: expected every layer uploaded, got {result}")
        return seconds

    def theirs() -> float:
        prefix = new_prefix("bk")
        try:
            seconds, uploaded = buildkit_export(ctx.s3, ctx.theirs, prefix, cache, ctx.part_size)
        finally:
            drop_prefix(ctx.s3, ctx.theirs, prefix)
        if uploaded != len(cache.layers):
            raise RuntimeError(f"{name}: baseline uploaded {uploaded} blobs")
        return seconds

    return _row(name, *_paired(ctx, name, ours, theirs))


def _present(ctx: Context, name: str, cache: BenchCache) -> Row:
    mine, theirs_prefix = new_prefix("cs"), new_prefix("bk")
    try:
        ctx.export(cache, mine)
        buildkit_export(ctx.s3, ctx.theirs, theirs_prefix, cache, ctx.part_size)

        def ours() -> float:
            seconds, result = ctx.export(cache, mine)
            if result.get("layers_skipped") != len(cache.layers):
                raise RuntimeError(f"{name}: expected every layer skipped, got {result}")
            return seconds

        def theirs() -> float:
            seconds, uploaded = buildkit_export(
                ctx.s3, ctx.theirs, theirs_prefix, cache, ctx.part_size
            )
            if uploaded:
                raise RuntimeError(f"{name}: baseline uploaded {uploaded} blobs")
            return seconds

        return _row(name, *_paired(ctx, name, ours, theirs))
    finally:
        drop_prefix(ctx.s3, ctx.ours, mine)
        drop_prefix(ctx.s3, ctx.theirs, theirs_prefix)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(
    argv: list[str], env: dict[str, str], cpu: list[float] | None = None
) -> tuple[float, str]:
    """Wall seconds of a fresh process (and its CPU seconds into ``cpu``), and its stdout."""
    cpu0, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    if cpu is not None:
        cpu.append(_children_cpu() - cpu0)
    return seconds, done.stdout


def fixed_costs(ctx: Context) -> list[Row]:
    """The command line's own cost, and enqueue-to-result of a warm 4-layer export."""
    assert ctx.cacheship.client is not None
    client = ctx.cacheship.client
    runs = 3 if ctx.sizes.smoke else 7
    env = {**ctx.cacheship.env(), "CACHESHIP_REDIS_URL": ctx.cacheship.redis.url}
    cache = ctx.cache("fixed", [64 * KiB] * 4)
    prefix = new_prefix("fixed")
    cli = [sys.executable, "-m", "worker.cli"]
    export = [*cli, "export", "--from", f"type=local,src={cache.path}"]
    export += ["--to", f"type=s3,bucket={ctx.ours},prefix={prefix}"]
    try:
        ctx.export(cache, prefix)  # every layer in the bucket from here on
        enqueue: list[float] = []
        enqueue_cpu: list[float] = []
        for _ in range(runs):
            seconds, out = _timed(export, env, enqueue_cpu)
            enqueue.append(seconds)
            client.wait(out.split()[0], timeout=600)  # let it finish before the next run
        bare = [_timed([sys.executable, "-c", "pass"], env)[0] for _ in range(runs)]
        helps = [_timed([*cli, "--help"], env)[0] for _ in range(runs)]
        to_result = [ctx.export(cache, prefix)[0] for _ in range(runs)]
        baseline = [
            buildkit_export(ctx.s3, ctx.ours, prefix, cache, ctx.part_size)[0]
            for _ in range(runs)
        ]
    finally:
        drop_prefix(ctx.s3, ctx.ours, prefix)
    ctx.log(f"  fixed: enqueue {enqueue}, to result {to_result}")
    return [
        Row(
            scenario="0 CLI enqueue (no --wait)",
            unit="s",
            cacheship=_median(enqueue),
            baseline=_median(bare),
            ratio=None,
            target="<= 0.25 s",
            passed=_median(enqueue) <= 0.25,
            notes=(
                f"`python -m worker.cli export` as a fresh process, median of {runs} "
                f"(min {min(enqueue):.3f}, CPU {_median(enqueue_cpu):.3f} s); baseline column: "
                "`python -c pass`; "
                f"`cacheship --help` {_median(helps):.3f} s"
            ),
            detail={"runs": enqueue, "cpu": enqueue_cpu, "bare_python": bare, "help": helps},
        ),
        Row(
            scenario="0 enqueue to result, 4-layer warm export",
            unit="s",
            cacheship=_median(to_result),
            baseline=_median(baseline),
            ratio=_ratio(_median(to_result), _median(baseline)),
            target="<= 0.15 s",
            passed=_median(to_result) <= 0.15,
            notes=(
                f"Client.submit to Client.wait's result on a warm worker, median of {runs} "
                f"(p90 {statistics.quantiles(to_result, n=10)[-1]:.3f}); baseline column: "
                "the BuildKit-equivalent export of the same present cache"
            ),
            detail={"runs": to_result, "baseline_runs": baseline},
        ),
    ]

