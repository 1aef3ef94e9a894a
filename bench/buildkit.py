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
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from boto3.s3.transfer import create_transfer_manager
from botocore.exceptions import ClientError

from bench.data import BenchCache
from bench.scenarios import Context, Row, _median, _ratio
from bench.servers import ACCESS_KEY, SECRET_KEY, cpu_seconds
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


#: The binary that exports a local cache with BuildKit's own ``cache/remotecache/s3`` code.
BUILDKIT_EXPORTER = "CACHESHIP_BENCH_BUILDKIT_EXPORTER"


def shapes(ctx: Context) -> list[tuple[str, list[int]]]:
    """The caches compared: big layers, small layers, and a ``mode=max`` build's mix."""
    if ctx.sizes.smoke:
        return [
            ("big 2x6 MiB", [6 * MiB] * 2),
            ("small 12x64 KiB", [64 * KiB] * 12),
            ("mode=max mix 1+2+6", [3 * MiB] + [512 * KiB] * 2 + [4 * KiB] * 6),
        ]
    # mode=max keeps every intermediate step: a few big layers (the base, the toolchain),
    # some middling ones (dependencies) and many tiny ones (COPY of a file, a RUN's config).
    mixed = [24 * MiB] * 3 + [2 * MiB] * 4 + [8 * KiB] * 30
    return [
        ("big 4x48 MiB", [48 * MiB] * 4),
        ("small 200x64 KiB", [64 * KiB] * 200),
        ("mode=max mix 3x24 MiB+4x2 MiB+30x8 KiB", mixed),
    ]


def real_buildkit_export(ctx: Context, bucket: str, prefix: str, cache: BenchCache) -> float:
    """BuildKit's own exporter (the harness binary) exports ``cache``; the seconds it reports.

    The harness times the exporter inside its process (resolve, fill the chains, Finalize),
    as buildkitd, a long-running daemon, pays no process start for an export.
    """
    assert ctx.buildkit_exporter is not None
    argv = [
        ctx.buildkit_exporter,
        "-cache", str(cache.path),
        "-endpoint", ctx.s3_url,
        "-bucket", bucket,
        "-prefix", prefix,
        "-upload-parallelism", str(PARALLEL),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"BuildKit's exporter failed: {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return float(report["seconds"])


def _blobs_under(ctx: Context, bucket: str, prefix: str) -> int:
    pages = ctx.s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}blobs/"
    )
    return sum(len(page.get("Contents", [])) for page in pages)


def against_buildkit(ctx: Context) -> list[Row]:
    """Every shape into an empty prefix and with every blob present, three sides each."""
    rows = []
    for label, sizes in shapes(ctx):
        cache = ctx.cache("bk-" + label.split()[0].replace("=", ""), sizes)
        rows.append(_compare(ctx, f"9 vs BuildKit: {label}, empty bucket", cache, warm=False))
        rows.append(_compare(ctx, f"9 vs BuildKit: {label}, all present", cache, warm=True))
        shutil.rmtree(cache.path, ignore_errors=True)
    return rows


Side = Callable[[], float]


def _rotated(ctx: Context, label: str, sides: dict[str, Side]) -> tuple[
    dict[str, list[float]], dict[str, list[float]]
]:
    """Run every side once per round, the order rotated each round (drift hits all alike).

    Returns the seconds of each side, and CPU seconds of cacheship's worker and of the S3
    server during cacheship's runs (``worker``, ``server``).
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {"worker": [], "server": []}
    names = list(sides)
    for i in range(ctx.sizes.runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            if name == "cacheship":
                pids = ctx.cacheship.pids()
                worker0 = sum(cpu_seconds(p) for p in pids)
                server0 = cpu_seconds(ctx.server_pid)
            times[name].append(sides[name]())
            if name == "cacheship":
                cpu["worker"].append(sum(cpu_seconds(p) for p in pids) - worker0)
                cpu["server"].append(cpu_seconds(ctx.server_pid) - server0)
        ctx.log(f"  {label} run {i + 1}: " + ", ".join(
            f"{name} {times[name][-1]:.3f}s" for name in names
        ))
    return times, cpu


def _compare(ctx: Context, name: str, cache: BenchCache, warm: bool) -> Row:
    """cacheship, BuildKit's exporter (when built) and the raw floor on one cache."""
    count = len(cache.layers)
    kept: dict[str, str] = {}

    def prefix_for(side: str) -> str:
        if warm:
            return kept[side]
        return new_prefix(side[:2])

    def done_with(bucket: str, prefix: str) -> None:
        if not warm:
            drop_prefix(ctx.s3, bucket, prefix)

    def ours() -> float:
        prefix = prefix_for("cacheship")
        try:
            seconds, result = ctx.export(cache, prefix)
        finally:
            done_with(ctx.ours, prefix)
        key, want = ("layers_skipped", count) if warm else ("layers_uploaded", count)
        if result.get(key) != want:
            raise RuntimeError(f"{name}: expected {key}={want}, got {result}")
        return seconds

    def buildkit() -> float:
        prefix = prefix_for("buildkit")
        try:
            seconds = real_buildkit_export(ctx, ctx.theirs, prefix, cache)
            stored = _blobs_under(ctx, ctx.theirs, prefix)
        finally:
            done_with(ctx.theirs, prefix)
        if stored != count:
            raise RuntimeError(f"{name}: BuildKit's exporter left {stored} of {count} blobs")
        return seconds

    def raw() -> float:
        prefix = prefix_for("raw")
        try:
            seconds, uploaded = buildkit_export(ctx.s3, ctx.theirs, prefix, cache, ctx.part_size)
        finally:
            done_with(ctx.theirs, prefix)
        if uploaded != (0 if warm else count):
            raise RuntimeError(f"{name}: the raw client uploaded {uploaded} blobs")
        return seconds

    sides: dict[str, Side] = {"cacheship": ours, "raw": raw}
    if ctx.buildkit_exporter:
        sides["buildkit"] = buildkit
    try:
        if warm:
            kept.update({side: new_prefix(side[:2]) for side in sides})
            ctx.export(cache, kept["cacheship"])
            buildkit_export(ctx.s3, ctx.theirs, kept["raw"], cache, ctx.part_size)
            if "buildkit" in kept:
                real_buildkit_export(ctx, ctx.theirs, kept["buildkit"], cache)
        times, cpu = _rotated(ctx, name, sides)
    finally:
        if warm:
            drop_prefix(ctx.s3, ctx.ours, kept.get("cacheship", new_prefix("none")))
            for side in ("raw", "buildkit"):
                if side in kept:
                    drop_prefix(ctx.s3, ctx.theirs, kept[side])
    ours_s = _median(times["cacheship"])
    raw_s = _median(times["raw"])
    peer = "buildkit" if "buildkit" in times else "raw"
    peer_s = _median(times[peer])
    if warm:
        target, passed = "<= BuildKit + 0.20 s", ours_s <= peer_s + 0.2
    else:
        ratio = _ratio(ours_s, peer_s)
        target, passed = "<= 1.00", ratio is not None and ratio <= 1.0
    mib = cache.bytes_total / MiB
    return Row(
        scenario=name,
        unit="s",
        cacheship=ours_s,
        baseline=peer_s,
        ratio=_ratio(ours_s, peer_s),
        target=target,
        passed=passed if peer == "buildkit" else None,
        notes=(
            f"{count} layers, {mib:.1f} MiB; baseline: "
            + ("BuildKit's cache/remotecache/s3 exporter" if peer == "buildkit"
               else "BuildKit's exporter not built (--buildkit-exporter): the raw client")
            + f"; raw floor (HEAD every blob, upload the missing {PARALLEL} at a time, PUT "
            f"the name) {raw_s:.3f} s; cacheship worker CPU {_median(cpu['worker']):.2f} s, "
            f"server CPU {_median(cpu['server']):.2f} s"
        ),
        detail={
            "runs": times,
            "cpu_seconds": cpu,
            "layers": count,
            "bytes": cache.bytes_total,
            "peer": peer,
        },
    )


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
    """What every export pays whatever its size: the command line, submit, a warm export."""
    assert ctx.cacheship.client is not None
    client = ctx.cacheship.client
    runs = 3 if ctx.sizes.smoke else 9
    env = {**ctx.cacheship.env(), "CACHESHIP_REDIS_URL": ctx.cacheship.redis.url}
    cache = ctx.cache("fixed", [64 * KiB] * 5)
    prefix = new_prefix("fixed")
    bk_prefix = new_prefix("fixed-bk")
    cli = [sys.executable, "-m", "worker.cli"]
    export = [*cli, "export", "--from", f"type=local,src={cache.path}"]
    export += ["--to", f"type=s3,bucket={ctx.ours},prefix={prefix}"]
    request = {
        "source": {"type": "local", "src": str(cache.path)},
        "target": {"type": "s3", "bucket": ctx.ours, "prefix": prefix},
    }
    try:
        ctx.export(cache, prefix)  # every layer in the bucket from here on
        enqueue: list[float] = []
        enqueue_cpu: list[float] = []
        for _ in range(runs):
            seconds, out = _timed(export, env, enqueue_cpu)
            enqueue.append(seconds)
            client.wait(out.split()[0], timeout=600)  # let it finish before the next run
        waited = [_timed([*export, "--wait"], env)[0] for _ in range(runs)]
        bare = [_timed([sys.executable, "-c", "pass"], env)[0] for _ in range(runs)]
        helps = [_timed([*cli, "--help"], env)[0] for _ in range(runs)]
        submits: list[float] = []
        for _ in range(runs * 3):
            started = time.perf_counter()
            export_id = client.submit(request)
            submits.append(time.perf_counter() - started)
            client.wait(export_id, timeout=600, interval=0.01)
        to_result = [ctx.export(cache, prefix)[0] for _ in range(runs)]
        raw = [
            buildkit_export(ctx.s3, ctx.ours, prefix, cache, ctx.part_size)[0]
            for _ in range(runs)
        ]
        peer = "raw client"
        if ctx.buildkit_exporter:
            real_buildkit_export(ctx, ctx.theirs, bk_prefix, cache)
            real = [real_buildkit_export(ctx, ctx.theirs, bk_prefix, cache) for _ in range(runs)]
            peer = "BuildKit's exporter"
        else:
            real = raw
    finally:
        drop_prefix(ctx.s3, ctx.ours, prefix)
        drop_prefix(ctx.s3, ctx.theirs, bk_prefix)
    ctx.log(f"  fixed: enqueue {enqueue}, to result {to_result}")
    peer_s = _median(real)
    return [
        Row(
            scenario="0 CLI enqueue (no --wait)",
            unit="s",
            cacheship=_median(enqueue),
            baseline=_median(bare),
            ratio=None,
            target="<= 0.15 s",
            passed=_median(enqueue) <= 0.15,
            notes=(
                f"`python -m worker.cli export` as a fresh process, median of {runs} "
                f"(min {min(enqueue):.3f}, CPU {_median(enqueue_cpu):.3f} s); baseline column: "
                "`python -c pass`; "
                f"`cacheship --help` {_median(helps):.3f} s"
            ),
            detail={"runs": enqueue, "cpu": enqueue_cpu, "bare_python": bare, "help": helps},
        ),
        Row(
            scenario="0 Client.submit",
            unit="ms",
            cacheship=_median(submits) * 1000,
            baseline=None,
            ratio=None,
            target="<= 5 ms",
            passed=_median(submits) <= 0.005,
            notes=(
                f"validate and enqueue in a warm process, median of {len(submits)} "
                f"(p90 {statistics.quantiles(submits, n=10)[-1] * 1000:.2f} ms)"
            ),
            detail={"runs": submits},
        ),
        Row(
            scenario="0 warm 5-layer export, submit to result",
            unit="s",
            cacheship=_median(to_result),
            baseline=peer_s,
            ratio=_ratio(_median(to_result), peer_s),
            target="<= 0.25 s",
            passed=_median(to_result) <= 0.25,
            notes=(
                f"Client.submit to Client.wait's result on a warm worker, median of {runs} "
                f"(p90 {statistics.quantiles(to_result, n=10)[-1]:.3f}); baseline column: "
                f"{peer} on the same present cache (raw client {_median(raw):.3f} s); "
                f"`cacheship export --wait` as a fresh process: {_median(waited):.3f} s"
            ),
            detail={
                "runs": to_result, "baseline_runs": real, "raw_runs": raw, "cli_wait": waited,
            },
        ),
    ]
