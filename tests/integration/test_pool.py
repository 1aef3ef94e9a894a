"""The worker's pool: threads unless CACHESHIP_POOL says prefork.

``celery worker`` cannot tell ``--pool prefork`` from its own default, so the pool comes from
the settings; a real worker started as an operator starts it (``celery -A worker worker``)
reports which pool it runs, and a real export goes through it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.stack import Worker, child_pids
from worker.client import Client
from worker.samplecache import write_sample_cache


def _pool(client: Client) -> dict[str, object]:
    stats = client.app.control.inspect(timeout=5).stats() or {}
    assert len(stats) == 1, stats
    ((_, info),) = stats.items()
    pool: dict[str, object] = info["pool"]
    return pool


@pytest.mark.parametrize(("setting", "implementation"), [(None, "thread"), ("prefork", "prefork")])
def test_the_pool_comes_from_the_settings(
    setting: str | None,
    implementation: str,
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    source_root: Path,
    bucket: str,
) -> None:
    if setting is not None:
        env = {**env, "CACHESHIP_POOL": setting}
    worker = workers(env, name=f"pool-{implementation}", concurrency=3)
    pool = _pool(client)
    assert implementation in str(pool["implementation"])
    assert pool["max-concurrency"] == 3
    children = child_pids(worker.proc.pid)
    assert (len(children) == 3) if setting == "prefork" else (children == [])
    cache = write_sample_cache(source_root / "app", [300_000, 40_000, 2_000], seed=3)
    request = {"source": {"type": "local", "src": str(cache.path)},
               "target": {"type": "s3", "bucket": bucket}}
    result = client.wait(client.submit(request), timeout=120, interval=0.2)
    assert result["layers_uploaded"] == 3
    # The same cache again: every layer is found stored by the export's own HEADs.
    second = client.submit(request)
    again = client.wait(second, timeout=120, interval=0.2)
    assert again["layers_skipped"] == 3 and again["bytes_sent"] == 0
    snap = client.snapshot(second)
    layers = [s for s in snap.steps if s.kind == "layer"]
    assert [s.state for s in layers] == ["SUCCESS"] * 3
    assert {s.status for s in layers} == {"skipped"}
