"""A kill storm: whole workers SIGKILLed at random moments across four exports sharing layers.

Project defaults (lease, stall timeout, threads pool); each kill takes the main process and
every child at once, as a node loss does, and a replacement starts a moment later, as
Kubernetes restarts a pod. Nobody resubmits anything: every export must end SUCCESS on its
own, with sound names and no multipart upload left open.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_export import assert_sound_cache
from tests.integration.test_faults import (
    MiB,
    Supervisor,
    local,
    open_uploads,
    proxied_env,
    target,
    wait_supervised,
)
from tests.integration.test_fleet import copying_on, verify_deep
from tests.stack import Worker
from worker.client import Client
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache

KILLS = 8


@pytest.mark.slow
def test_kill_storm_across_four_exports_sharing_layers_ends_every_export(
    redis_server: ServerProcess,
    s3_server: ServerProcess,
    proxy: FaultProxy,
    source_root: Path,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
) -> None:
    draw = random.Random(20261202)
    shared = [2 * MiB, 2 * MiB, 1 * MiB, 300_000]
    caches = [
        # One seed: the same four base layers; sizes of their own: two layers of their own.
        write_sample_cache(
            source_root / f"build-{i}", [*shared, MiB + 1000 * i, 100_000 + i], seed=77
        )
        for i in range(4)
    ]
    proxy.plan = FaultPlan(bandwidth=128 * 1024)  # a 2 MiB layer takes about 16 s
    env = proxied_env(redis_server.url, proxy, source_root)
    supervisor = Supervisor(
        lambda name: workers(env, name=name, concurrency=2), ["a", "b", "c"]
    )
    ids = [
        client.submit({"source": local(c), "target": target(bucket, name=f"build-{i}")})
        for i, c in enumerate(caches)
    ]

    kills, mid_copy, last_kill = 0, 0, 0.0
    deadline = time.monotonic() + 300
    while kills < KILLS:
        assert time.monotonic() < deadline, f"only {kills} kills in five minutes"
        time.sleep(draw.uniform(0.5, 6.0))  # a random moment
        supervisor.check()
        if all(client.snapshot(i, with_steps=False).ready for i in ids):
            break
        busy = set().union(*(copying_on(client, i, c) for i, c in zip(ids, caches, strict=True)))
        # Mostly workers in the middle of a copy, now and then any worker at all.
        candidates = [w for w in supervisor.running if w.name in busy] or supervisor.running
        victim = draw.choice(candidates)
        mid_copy += victim.name in busy
        victim.kill_all()
        kills, last_kill = kills + 1, time.monotonic()
        time.sleep(1)  # the replacement pod comes up a little later
        supervisor.check()
    assert kills == KILLS, f"the exports ended after only {kills} kills"
    proxy.plan = FaultPlan()

    results = [wait_supervised(client, i, supervisor, timeout=420) for i in ids]
    took = time.monotonic() - last_kill
    for i, (cache, result) in enumerate(zip(caches, results, strict=True)):
        assert_sound_cache(s3, bucket, result, cache, [f"build-{i}"])
        verify_deep(env, bucket, s3_server.url, name=f"build-{i}")
    assert open_uploads(s3, bucket) == []
    logs = supervisor.logs()
    redriven = logs.count("no progress for")
    print(
        f"\nkill storm: {kills} whole-worker kills ({mid_copy} mid-copy), {supervisor.restarts} "
        f"restarts; all 4 exports SUCCESS {took:.0f}s after the last kill; "
        f"watchdog re-drives: {redriven}"
    )
