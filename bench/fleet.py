"""Scenario 10: the same export on one worker and on two, and a small layer's worker CPU.

A fleet is how cacheship scales past one worker: two workers consume the same queue, each
layer is one task, and the blob leases keep two exports of one blob from both uploading it.
The export of many small layers is timed with one worker, then with a second worker started
beside it (the two alternate, one worker first). The single worker's CPU seconds per layer
are the cost of a layer task (its profile: ``python -m bench.pools --profile``).
"""

from __future__ import annotations

import os

from bench.scenarios import Context, Row, _median
from bench.servers import cpu_seconds
from bench.stack import drop_prefix, new_prefix
from tests.stack import Worker, start_worker

KiB = 1024


def _size(ctx: Context) -> tuple[int, int]:
    return (40, 4 * KiB) if ctx.sizes.smoke else (1000, 64 * KiB)


def fleet(ctx: Context) -> list[Row]:
    count, size = _size(ctx)
    cache = ctx.cache("fleet", [size] * count)
    second: Worker | None = None
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu_per_layer: list[float] = []

    def one_run(workers: int) -> None:
        pids = ctx.cacheship.pids()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        prefix = new_prefix(f"fleet{workers}")
        try:
            seconds, result = ctx.export(cache, prefix)
        finally:
            drop_prefix(ctx.s3, ctx.ours, prefix)
        if result.get("layers_uploaded") != count:
            raise RuntimeError(f"fleet: expected every layer uploaded, got {result}")
        if workers == 1:
            cpu_per_layer.append((sum(cpu_seconds(p) for p in pids) - cpu0) / count)
        times[workers].append(seconds)
        ctx.log(f"  fleet, {workers} worker(s): {seconds:.2f}s")

    try:
        for i in range(ctx.sizes.runs):
            for workers in ((1, 2) if i % 2 == 0 else (2, 1)):
                if workers == 2 and second is None:
                    second = start_worker(
                        ctx.cacheship.env(), ctx.scratch, name=f"fleet{i}",
                        concurrency=ctx.concurrency,
                    )
                if workers == 1 and second is not None:
                    second.stop()
                    second = None
                one_run(workers)
    finally:
        if second is not None:
            second.stop()
    one, two = _median(times[1]), _median(times[2])
    speedup = one / two
    return [
        Row(
            scenario=f"10 fleet: {count}x{size // KiB} KiB, two workers vs one",
            unit="s",
            cacheship=two,
            baseline=one,
            ratio=speedup,
            target=">= 1.50 (speed-up)",
            passed=speedup >= 1.5,
            notes=(
                f"cacheship column: two workers (-c {ctx.concurrency} each); baseline column: "
                f"one worker; ratio = one / two; the machine has {os.cpu_count()} CPUs "
                "shared by the S3 server, Redis, the workers and the benchmark"
            ),
            detail={"one_worker": times[1], "two_workers": times[2]},
        ),
        Row(
            scenario=f"10 worker CPU per small layer ({size // KiB} KiB)",
            unit="ms",
            cacheship=_median(cpu_per_layer) * 1000,
            baseline=None,
            ratio=None,
            target="report only",
            passed=None,
            notes=(
                "CPU seconds of the one worker's process during an export of "
                f"{count} absent layers, per layer (the export task and finalize included)"
            ),
            detail={"runs_s_per_layer": cpu_per_layer},
        ),
    ]

