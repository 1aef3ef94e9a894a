"""Redis down for 30 s and for 90 s in the middle of the upload phase: nothing fails.

Project defaults throughout (lease, Redis patience, stall timeout); Redis writes an
append-only file and comes back with its data, as the chart's and compose's Redis do. The
S3 server sits behind the throttling proxy so that layers are still being uploaded when
Redis stops. While it is down, `cacheship export --wait`, `cacheship status --wait` and the
Python client's `wait` keep waiting and say they wait for Redis; once it is back the export
completes and all three report SUCCESS.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_cli import CACHESHIP
from tests.integration.test_export import assert_sound_cache
from tests.integration.test_faults import (
    MiB,
    Supervisor,
    layer_task_id,
    open_uploads,
    proxied_env,
)
from tests.integration.test_fleet import copying_on, verify_deep
from tests.stack import Worker
from worker.client import Client
from worker.embedded import ServerProcess, start_redis
from worker.samplecache import write_sample_cache


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _stop_and_keep(server: ServerProcess) -> None:
    """Stop the server process; its data directory (the append-only file) stays."""
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("outage", [30, 90])
def test_redis_outage_in_the_upload_phase_is_waited_out(
    outage: int,
    proxy: FaultProxy,
    s3_server: ServerProcess,
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
    waiting: list[subprocess.Popen[str]] = []
    try:
        # 2 MiB layers at 40 KiB/s: about 50 s of upload each, four at a time.
        cache = write_sample_cache(source_root / "app", [2 * MiB] * 6 + [300_000] * 2, seed=61)
        proxy.plan = FaultPlan(bandwidth=40 * 1024)
        env = proxied_env(redis.url, proxy, source_root)
        supervisor = Supervisor(lambda name: workers(env, name=name, concurrency=2), ["a", "b"])
        cli_env = {**env, "CACHESHIP_REDIS_URL": redis.url}
        exporting = subprocess.Popen(
            [CACHESHIP, "export", "--from", f"type=local,src={cache.path}",
             "--to", f"type=s3,bucket={bucket}", "--wait"],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        waiting.append(exporting)
        assert exporting.stdout is not None
        export_id = exporting.stdout.readline().strip()
        assert export_id, "export --wait printed no id"
        following = subprocess.Popen(
            [CACHESHIP, "status", export_id, "--wait"],
            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        waiting.append(following)
        client = Client(redis.url)
        said = Collect()
        logging.getLogger("cacheship.client").addHandler(said)
        outcome: dict[str, Any] = {}

        def wait() -> None:
            try:
                outcome["result"] = client.wait(export_id, timeout=900)
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()

        deadline = time.monotonic() + 90
        while len(copying_on(client, export_id, cache)) < 2:
            assert time.monotonic() < deadline, "layers were never being uploaded"
            supervisor.check()
            time.sleep(0.2)
        time.sleep(5)  # bytes on their way to S3
        assert not client.snapshot(export_id).ready

        _stop_and_keep(redis)
        down_at = time.monotonic()
        while time.monotonic() - down_at < outage:
            supervisor.check()  # a worker that exits meanwhile is restarted, as a pod is
            time.sleep(1)
        redis = start_redis(port=redis.port, extra_args=durable)
        back_at = time.monotonic()

        while waiter.is_alive() and time.monotonic() - back_at < 600:
            supervisor.check()
            waiter.join(2)
        assert "error" not in outcome, f"client.wait: {outcome.get('error')!r}"
        assert "result" in outcome, "client.wait never returned"
        result = outcome["result"]
        took = time.monotonic() - back_at
        assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
        assert open_uploads(s3, bucket) == []
        verify_deep(env, bucket, s3_server.url)

        for name, proc in (("export --wait", exporting), ("status --wait", following)):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (name, proc.returncode, err[-3000:])
            assert "waiting for Redis" in err, (name, err[-3000:])
            assert "complete" in out or "complete" in err, (name, out[-2000:], err[-2000:])
        assert any("waiting for Redis" in line for line in said.lines), said.lines
        logging.getLogger("cacheship.client").removeHandler(said)
        logs = supervisor.logs()
        deliveries = sum(
            len(re.findall(rf"\[{layer_task_id(export_id, d.digest)}\] received", logs))
            for d in cache.layers
        )
        print(
            f"\nRedis down {outage}s in the upload phase: export complete {took:.0f}s after it "
            f"came back; {supervisor.restarts} worker restarts; layers "
            f"{result['layers_uploaded']} uploaded, {result['layers_skipped']} skipped; "
            f"{deliveries} deliveries of {len(cache.layers)} layer tasks"
        )
    finally:
        for proc in waiting:
            if proc.poll() is None:
                proc.kill()
        redis.stop()
