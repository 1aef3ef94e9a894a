"""No one in: a request reaches only the endpoints and buckets the operator listed.

An "attacker" listens on a loopback port and counts every connection it receives. Requests
naming it as source or target endpoint are refused (by the worker, by the client and by
the command line when they have the settings) and it receives none; a bucket outside the
lists is refused with nothing written; a second endpoint the operator listed works.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faultproxy import FaultProxy
from tests.integration.test_export import assert_sound_cache
from tests.stack import Worker, worker_env
from worker.client import Client, ExportError
from worker.embedded import LOOPBACK, ServerProcess
from worker.samplecache import SampleCache, write_sample_cache

CACHESHIP = str(Path(sys.executable).with_name("cacheship"))
MiB = 1024 * 1024


class Listener:
    """A TCP socket that accepts and counts connections (and reads whatever is sent)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                self.received += conn.recv(65536)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def attacker() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def s3_spec(bucket: str, **attrs: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, **attrs}


def local(cache: SampleCache) -> dict[str, Any]:
    return {"type": "local", "src": str(cache.path)}


def refused(client: Client, request: dict[str, Any], match: str) -> str:
    with pytest.raises(ExportError, match=match) as failure:
        client.wait(client.submit(request), timeout=60)
    return str(failure.value)


def test_endpoints_and_buckets_outside_the_lists_are_refused_and_reach_nothing(
    redis_server: ServerProcess,
    s3_server: ServerProcess,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    source_root: Path,
    attacker: Listener,
    tmp_path: Path,
) -> None:
    team, golden, other = (f"{n}-{uuid.uuid4().hex[:10]}" for n in ("team", "golden", "other"))
    for name in (team, golden, other):
        s3.create_bucket(Bucket=name)
    cache = write_sample_cache(source_root / "app", [3 * MiB, 200_000, 9_000], seed=191)
    with FaultProxy(s3_server.url, seed=19, max_seconds=300) as second:
        env = worker_env(
            redis_server.url,
            s3_server.url,
            source_root,
            CACHESHIP_ALLOWED_ENDPOINTS=second.url,
            CACHESHIP_ALLOWED_BUCKETS=team,
            CACHESHIP_READABLE_BUCKETS=golden,
            CACHESHIP_COPY_MAX_RETRIES="2",
        )
        workers(env, concurrency=2)

        # A protected cache, written by its owner: read-only for the fleet.
        seeded = client.wait(
            client.submit({"source": local(cache), "target": s3_spec(team, prefix="seed/")}),
            timeout=90,
        )
        assert seeded["status"] == "complete"
        for bucket in (golden, other):
            for key in keys(s3, team, "seed/"):
                s3.copy_object(
                    Bucket=bucket, Key=key.removeprefix("seed/"),
                    CopySource={"Bucket": team, "Key": key},
                )

        # The attacker as target endpoint, then as source endpoint: refused by the worker
        # (this client has no settings, so it cannot tell), before any connection.
        text = refused(
            client,
            {"source": local(cache), "target": s3_spec(team, endpoint_url=attacker.url)},
            r"target\.endpoint_url: .* is not an allowed endpoint",
        )
        assert "CACHESHIP_ALLOWED_ENDPOINTS" in text and "CACHESHIP_S3_ENDPOINT_URL" in text
        refused(
            client,
            {"source": s3_spec(golden, endpoint_url=attacker.url), "target": s3_spec(team)},
            r"source\.endpoint_url: .* CACHESHIP_ALLOWED_ENDPOINTS",
        )
        # Spellings that put an allowed host in front of the attacker's.
        allowed_host = s3_server.url.removeprefix("http://")
        for trick in (
            f"http://{allowed_host}@{LOOPBACK}:{attacker.port}",
            f"http://{LOOPBACK}:{attacker.port}#@{allowed_host}",
            f"http://{LOOPBACK}:{attacker.port}/{allowed_host}",
        ):
            with pytest.raises(ValueError, match=r"target\.endpoint_url"):
                client.submit({"source": local(cache), "target": s3_spec(team, endpoint_url=trick)})

        # A source bucket outside both lists; a read-only bucket as target: refused, and
        # nothing is written anywhere.
        before = {b: keys(s3, b) for b in (team, golden, other)}
        refused(
            client,
            {"source": s3_spec(other), "target": s3_spec(team, prefix="stolen/")},
            r"source\.bucket: .* in neither CACHESHIP_ALLOWED_BUCKETS nor "
            r"CACHESHIP_READABLE_BUCKETS",
        )
        refused(
            client,
            {"source": local(cache), "target": s3_spec(golden, prefix="overwrite/")},
            r"target\.bucket: .* read-only: it is listed in CACHESHIP_READABLE_BUCKETS",
        )
        assert {b: keys(s3, b) for b in (team, golden, other)} == before

        # What is allowed works: promoting the read-only cache into the team bucket through
        # the second endpoint the operator listed (spelled in upper case, with a slash).
        assert second.stats.requests == 0
        spelled = second.url.upper() + "/"
        promoted = client.wait(
            client.submit(
                {
                    "source": s3_spec(golden, endpoint_url=spelled, use_path_style=True),
                    "target": s3_spec(team, prefix="promoted/", endpoint_url=spelled,
                                      use_path_style=True),
                }
            ),
            timeout=90,
        )
        assert_sound_cache(s3, team, promoted, cache, ["buildkit"], prefix="promoted/")
        assert second.stats.requests > 0, "the second endpoint carried the export"

        # The command line, with the workers' settings in its environment, refuses at
        # enqueue with exit 2, naming the attribute and the setting; nothing is queued.
        cli_env = {**env, "CACHESHIP_REDIS_URL": redis_server.url}
        queued_before = redis.Redis.from_url(redis_server.url).llen("cacheship")
        for args, attribute in (
            (["--from", f"type=local,src={cache.path}",
              "--to", f"type=s3,bucket={team},endpoint_url={attacker.url}"],
             "--to: target.endpoint_url"),
            (["--from", f"type=s3,bucket={golden},endpoint_url={attacker.url}",
              "--to", f"type=s3,bucket={team}"],
             "--from: source.endpoint_url"),
            (["--from", f"type=s3,bucket={other}", "--to", f"type=s3,bucket={team}"],
             "--from: source.bucket"),
        ):
            done = subprocess.run(
                [CACHESHIP, "export", *args], env=cli_env, capture_output=True, text=True,
                timeout=60, check=False,
            )
            assert done.returncode == 2, done.stderr
            assert attribute in done.stderr and "CACHESHIP_" in done.stderr, done.stderr
        assert redis.Redis.from_url(redis_server.url).llen("cacheship") == queued_before

        # The client refuses at enqueue too when its process has the settings.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CACHESHIP_S3_ENDPOINT_URL", s3_server.url)
            with pytest.raises(ValueError, match=r"target\.endpoint_url: .* not an allowed"):
                client.submit({"source": local(cache),
                               "target": s3_spec(team, endpoint_url=attacker.url)})

    time.sleep(1.0)  # any connection attempt still on its way would have arrived
    assert attacker.connections == 0 and attacker.received == b""
