"""buildx's S3 client attributes reach the botocore client the workers build for a target.

Real S3 server (moto over HTTP), real botocore clients built by ``Settings.s3_client``; what
each attribute changes is observed on the requests themselves through botocore's events.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from tasks.request import parse_target
from tasks.settings import Settings
from tests.stack import ACCESS_KEY, SECRET_KEY, Worker
from worker.client import Client
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


@contextmanager
def _observe(client: Any) -> Iterator[dict[str, Any]]:
    """Add Accept-Encoding as an SDK or proxy would, and record what is finally sent."""
    sent: dict[str, Any] = {}

    def add_header(request: Any, **_: Any) -> None:
        request.headers["Accept-Encoding"] = "gzip"

    def record(request: Any, **_: Any) -> None:
        sent.update(request.headers)

    client.meta.events.register_first("request-created.s3", add_header)
    client.meta.events.register("before-send.s3", record)
    try:
        yield sent
    finally:
        client.meta.events.unregister("request-created.s3", add_header)
        client.meta.events.unregister("before-send.s3", record)


def _signed_headers(sent: dict[str, Any]) -> list[str]:
    authorization = sent["Authorization"]
    text = authorization.decode() if isinstance(authorization, bytes) else authorization
    return text.split("SignedHeaders=")[1].split(",")[0].split(";")


@pytest.mark.usefixtures("credentials")
def test_disable_accept_encoding_keeps_the_header_out_of_the_signature(
    s3_server: ServerProcess, bucket: str
) -> None:
    settings = Settings(s3_endpoint_url=s3_server.url, s3_region="us-east-1")
    # A distinct upload_parallelism gives each client its own cache slot.
    plain = settings.s3_client(parse_target(f"type=s3,bucket={bucket},upload_parallelism=61"))
    stripped = settings.s3_client(
        parse_target(
            f"type=s3,bucket={bucket},upload_parallelism=61,disable_accept_encoding=true"
        )
    )
    for client, signed in ((plain, True), (stripped, False)):
        with _observe(client) as sent:
            client.put_object(Bucket=bucket, Key="probe", Body=b"x")  # the signature is valid
        assert ("accept-encoding" in _signed_headers(sent)) is signed


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.usefixtures("credentials")
@pytest.mark.parametrize(("mode", "attempts"), [("standard", 2), ("adaptive", 3)])
def test_retry_attributes_set_the_attempts_per_request(mode: str, attempts: int) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    settings = Settings(s3_endpoint_url=endpoint, s3_region="us-east-1", s3_max_attempts=9)
    spec = parse_target(
        f"type=s3,bucket=nowhere,retry_mode={mode},retry_max_attempts={attempts}"
    )
    client = settings.s3_client(spec)
    tries: list[str] = []

    def count(request: Any, **_: Any) -> None:
        tries.append(request.url)

    client.meta.events.register("before-send.s3", count)
    try:
        with pytest.raises(EndpointConnectionError):
            client.head_object(Bucket="nowhere", Key="k")
    finally:
        client.meta.events.unregister("before-send.s3", count)
    # BuildKit's meaning: attempts in all, the first included.
    assert len(tries) == attempts


def test_a_request_with_every_buildx_attribute_exports(
    env: dict[str, str],
    workers: Callable[..., Worker],
    redis_server: ServerProcess,
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    cache = write_sample_cache(source_root / "app", [300_000, 100_000], seed=3)
    workers(env, concurrency=1)
    client = Client(redis_server.url)
    target = {
        "type": "s3",
        "bucket": bucket,
        "name": f"app-{uuid.uuid4().hex[:6]}",
        "mode": "max",
        "ignore-error": True,
        "compression": "gzip",
        "compression-level": 6,
        "force-compression": False,
        "disable_accept_encoding": True,
        "retry_mode": "adaptive",
        "retry_max_attempts": 4,
    }
    result = client.wait(
        client.submit({"source": {"type": "local", "src": str(cache.path)}, "target": target}),
        timeout=180,
    )
    assert result["layers_uploaded"] == len(cache.layers)
    for layer in cache.layers:
        head = s3.head_object(Bucket=bucket, Key=f"blobs/{layer.digest}")
        assert head["ContentLength"] == layer.size
