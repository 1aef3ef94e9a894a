"""The compose file's worker and Flower services, run as local processes.

No Docker engine here, so each service's command and environment (as ``docker compose``
would resolve them from ``.env.example``) run against local Redis and S3 servers standing in
for ``redis:6379`` and ``minio:9000``. The test proves that the stack as written starts and
does an export, not only that the YAML is valid.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.compose import ServiceProcess, read_env_file, service_process
from tests.stack import REPO, s3_client
from worker.client import Client
from worker.embedded import ServerProcess, free_port, start_redis, start_s3, wait_for_port
from worker.samplecache import write_sample_cache

BIN = Path(sys.executable).parent
ENV_EXAMPLE = REPO / ".env.example"


def _local_argv(process: ServiceProcess, port_flags: dict[str, str]) -> list[str]:
    """The container's argv with its programs taken from this virtualenv."""
    program = process.argv[0]
    argv = [str(BIN / program) if (BIN / program).exists() else program, *process.argv[1:]]
    return [port_flags.get(arg, arg) for arg in argv]


@pytest.fixture
def compose_vars() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture
def redis_with_password(compose_vars: dict[str, str]) -> Iterator[ServerProcess]:
    server = start_redis(password=compose_vars["REDIS_PASSWORD"])
    yield server
    server.stop()


@pytest.fixture
def s3_for_compose() -> Iterator[ServerProcess]:
    server = start_s3()
    yield server
    server.stop()


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CACHESHIP_", "AWS_"))}
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=REPO, env={**base, **env}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _get(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_compose_worker_and_flower_start_and_export(
    tmp_path: Path, compose_vars: dict[str, str], redis_with_password: ServerProcess,
    s3_for_compose: ServerProcess,
) -> None:
    sources = tmp_path / "sources"
    heartbeat = tmp_path / "run" / "heartbeat"
    addresses = {
        "redis:6379": f"127.0.0.1:{redis_with_password.port}",
        "minio:9000": f"127.0.0.1:{s3_for_compose.port}",
    }
    environ = {"CACHESHIP_SOURCE_ROOTS": str(sources)}
    metrics_port = free_port()  # the compose file's 9808 may be taken on this host
    worker = service_process("worker", environ=environ).pointed_at(
        addresses,
        CACHESHIP_HEARTBEAT_FILE=str(heartbeat),
        CACHESHIP_METRICS_PORT=str(metrics_port),
        CACHESHIP_METRICS_ADDRESS="127.0.0.1",
    )
    flower = service_process("flower", environ=environ).pointed_at(addresses)
    flower_port = free_port()

    bucket = compose_vars["CACHESHIP_BUCKET"]
    s3 = s3_client(s3_for_compose.url)
    s3.create_bucket(Bucket=bucket)
    cache = write_sample_cache(sources / "app", [2 * 1024 * 1024, 300_000], seed=11)

    worker_proc = _spawn(_local_argv(worker, {}), worker.environment, tmp_path / "worker.log")
    flower_proc = _spawn(
        _local_argv(flower, {"--port=5555": f"--port={flower_port}"}),
        flower.environment, tmp_path / "flower.log",
    )
    try:
        client = Client(worker.environment["CACHESHIP_REDIS_URL"])
        export_id = client.submit({
            "source": {"type": "local", "src": str(cache.path)},
            "target": {"type": "s3", "bucket": bucket, "name": "main"},
        })
        result = client.wait(export_id, timeout=120)
        assert result["layers_uploaded"] == len(cache.layers)
        stored = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert {f"blobs/{d.digest}" for d in cache.layers} <= stored
        assert "manifests/main" in stored

        # Prometheus's view: the worker's /metrics counted the layers it uploaded.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            metrics = response.read().decode()
        uploaded = 'cacheship_layers_total{action="uploaded"}'
        assert f"{uploaded} {float(len(cache.layers))}" in metrics

        # The liveness probe's contract: the worker keeps its heartbeat file fresh.
        assert heartbeat.exists()
        assert time.time() - heartbeat.stat().st_mtime < 30

        wait_for_port(flower_port, None, timeout=30)
        user, password = compose_vars["FLOWER_USER"], compose_vars["FLOWER_PASSWORD"]
        api = f"http://127.0.0.1:{flower_port}/api/workers"
        assert _get(api) == 401, "Flower refuses requests without credentials"
        assert _get(api, f"{user}:wrong") == 401
        assert _get(api, f"{user}:{password}") == 200
    finally:
        _stop(worker_proc)
        _stop(flower_proc)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert compose_vars["MINIO_ROOT_PASSWORD"] not in log
    assert compose_vars["REDIS_PASSWORD"] not in log
