"""Security: JSON-only messages, allow-lists, no secret in Redis or logs, TLS Redis, HEAD 403.

Real servers and real workers throughout; the S3 secret the tests use is
``tests.stack.SECRET_KEY``, and it must never appear in Redis or in any log line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kombu import Connection, Exchange, Producer, Queue

from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_export import assert_sound_cache
from tests.stack import SECRET_KEY, Worker, worker_env
from worker.client import Client, ExportError
from worker.embedded import LOOPBACK, ServerProcess, free_port, start_redis
from worker.samplecache import SampleCache, write_sample_cache

MiB = 1024 * 1024


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def local(cache: SampleCache) -> dict[str, Any]:
    return {"type": "local", "src": str(cache.path)}


def target(bucket: str, **attrs: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, **attrs}


def redis_contents(url: str, **options: Any) -> Iterator[tuple[bytes, bytes]]:
    """Every key of every type with each of its values, as bytes."""
    client = redis.Redis.from_url(url, **options)
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[Any]
        if kind == "string":
            values = [client.get(key)]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [str(entry).encode() for entry in client.xrange(key)]
        else:
            values = []
        yield key, b""
        for value in values:
            yield key, value if isinstance(value, bytes) else str(value).encode()


def scan_redis(url: str, needle: str, **options: Any) -> tuple[int, int, list[str]]:
    """(keys, values, keys whose name or value holds ``needle``)."""
    found: set[str] = set()
    seen_keys: set[bytes] = set()
    values = 0
    raw = needle.encode()
    for key, value in redis_contents(url, **options):
        seen_keys.add(key)
        values += 1
        if raw in key or raw in value:
            found.add(key.decode(errors="replace"))
    return len(seen_keys), values, sorted(found)


def scan_files(paths: list[Path], needle: str) -> tuple[int, int, list[str]]:
    """(files, lines, files holding ``needle``)."""
    lines, hits = 0, []
    for path in paths:
        text = path.read_text(errors="replace")
        lines += text.count("\n")
        if needle in text:
            hits.append(str(path))
    return len(paths), lines, hits


@pytest.fixture
def cache(source_root: Path) -> SampleCache:
    return write_sample_cache(source_root / "app", [6 * MiB, 700_000, 30_000], seed=51)


# --------------------------------------------------------------------------- serializers


class Unpickled:
    """Unpickling this creates a directory: proof that a worker unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_workers_refuse_pickle_and_every_serializer_but_json(
    env: dict[str, str],
    workers: Callable[..., Worker],
    redis_server: ServerProcess,
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
    tmp_path: Path,
) -> None:
    worker = workers(env, concurrency=1)
    marker = tmp_path / "unpickled-by-a-worker"
    queue = Queue("cacheship", Exchange("cacheship", type="direct"), routing_key="cacheship")
    sent = []
    with Connection(redis_server.url) as connection:
        producer = Producer(connection)
        for serializer, body in (
            ("pickle", ([Unpickled(marker)], {}, {})),
            ("yaml", None),
            ("msgpack", None),
            ("custom", None),
        ):
            task_id = str(uuid.uuid4())
            headers = {"lang": "py", "task": "cacheship.export", "id": task_id}
            headers |= {"root_id": task_id, "parent_id": None, "group": None}
            if body is not None:
                producer.publish(
                    body,
                    serializer=serializer,
                    headers=headers,
                    exchange=queue.exchange,
                    routing_key="cacheship",
                    declare=[queue],
                )
            else:  # raw bytes with a content type the workers do not accept
                producer.publish(
                    b"!!python/object/apply:os.mkdir [x]",
                    content_type=f"application/x-{serializer}",
                    content_encoding="binary",
                    headers=headers,
                    exchange=queue.exchange,
                    routing_key="cacheship",
                    declare=[queue],
                )
            sent.append((serializer, task_id))

    deadline = time.monotonic() + 30
    while worker.log().count("ContentDisallowed") < len(sent):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.1)
    log = worker.log()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert not marker.exists(), "the pickled payload was never executed"
    broker = redis.Redis.from_url(redis_server.url)
    assert broker.llen("cacheship") == 0 and broker.hlen("unacked") == 0, "dropped, not requeued"
    for _, task_id in sent:
        assert client.app.AsyncResult(task_id).state == "PENDING", "no task ever ran"
    # The worker is still healthy: a JSON export goes through.
    result = client.wait(
        client.submit({"source": local(cache), "target": target(bucket)}), timeout=60
    )
    assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    assert not marker.exists()


# --------------------------------------------------------------------------- allow-lists


def test_buckets_are_limited_to_the_allow_list_and_sources_to_the_source_roots(
    redis_server: ServerProcess,
    s3_server: ServerProcess,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
    source_root: Path,
    tmp_path: Path,
) -> None:
    other = f"other-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=other)
    env = worker_env(redis_server.url, s3_server.url, source_root, CACHESHIP_ALLOWED_BUCKETS=bucket)
    workers(env, concurrency=2)

    done = client.wait(
        client.submit({"source": local(cache), "target": target(bucket)}), timeout=60
    )
    assert done["status"] == "complete"
    with pytest.raises(ExportError, match=r"target\.bucket: .* CACHESHIP_ALLOWED_BUCKETS"):
        client.wait(client.submit({"source": local(cache), "target": target(other)}), timeout=60)
    assert keys(s3, other) == []
    with pytest.raises(ExportError, match=r"source\.bucket: .* CACHESHIP_ALLOWED_BUCKETS"):
        client.wait(
            client.submit({"source": target(other), "target": target(bucket, prefix="x/")}),
            timeout=60,
        )
    assert keys(s3, bucket, "x/") == []

    outside = write_sample_cache(tmp_path / "elsewhere", [100_000], seed=52)
    with pytest.raises(ExportError, match=r"source\.src: outside the allowed source roots"):
        client.wait(
            client.submit({"source": local(outside), "target": target(bucket, prefix="y/")}),
            timeout=60,
        )
    (source_root / "sneaky").symlink_to(outside.path, target_is_directory=True)
    with pytest.raises(ExportError, match=r"source\.src: outside the allowed source roots"):
        client.wait(
            client.submit(
                {
                    "source": {"type": "local", "src": str(source_root / "sneaky")},
                    "target": target(bucket, prefix="y/"),
                }
            ),
            timeout=60,
        )
    assert keys(s3, bucket, "y/") == []


def test_local_sources_are_disabled_without_source_roots(
    redis_server: ServerProcess,
    s3_server: ServerProcess,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
    source_root: Path,
) -> None:
    workers(worker_env(redis_server.url, s3_server.url, source_root, CACHESHIP_SOURCE_ROOTS=""))
    with pytest.raises(ExportError, match=r"source\.src: local sources are disabled"):
        client.wait(client.submit({"source": local(cache), "target": target(bucket)}), timeout=60)
    assert keys(s3, bucket) == []


# --------------------------------------------------------------------------- secrets


def test_no_secret_in_redis_or_in_any_log_after_an_export_and_a_failure(
    redis_server: ServerProcess,
    s3_server: ServerProcess,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
    source_root: Path,
    tmp_path: Path,
) -> None:
    with FaultProxy(s3_server.url, FaultPlan(error_rate=0.08, cut_rate=0.04), seed=7) as proxy:
        env = worker_env(
            redis_server.url,
            proxy.url,
            source_root,
            CACHESHIP_PART_SIZE=str(5 * MiB),
            CACHESHIP_S3_MAX_ATTEMPTS="3",
            CACHESHIP_COPY_MAX_RETRIES="3",
        )
        # The most talkative worker there is: botocore and kombu log at DEBUG too.
        workers(env, name="debug", concurrency=2, extra_args=("--loglevel", "DEBUG"))
        workers(env, name="info", concurrency=2)
        done = client.wait(
            client.submit({"source": local(cache), "target": target(bucket)}), timeout=120
        )
        assert done["status"] == "complete"
        proxy.plan = FaultPlan(error_rate=1.0)
        with pytest.raises(ExportError, match="writing layer"):
            client.wait(
                client.submit({"source": local(cache), "target": target(bucket, prefix="f/")}),
                timeout=120,
            )
        with pytest.raises(ExportError, match="does not match"):
            corrupt = write_sample_cache(source_root / "corrupt", [200_000], seed=53)
            blob = corrupt.path / "blobs" / "sha256" / corrupt.layers[0].digest[7:]
            data = bytearray(blob.read_bytes())
            data[1000] ^= 0xFF
            blob.write_bytes(bytes(data))
            proxy.plan = FaultPlan()
            client.wait(
                client.submit({"source": local(corrupt), "target": target(bucket, prefix="c/")}),
                timeout=60,
            )
    key_count, value_count, in_redis = scan_redis(redis_server.url, SECRET_KEY)
    logs = [*sorted(tmp_path.glob("*.log")), redis_server.log_path]
    file_count, line_count, in_logs = scan_files(logs, SECRET_KEY)
    print(
        f"\nsecret scan: {key_count} Redis keys / {value_count} values, "
        f"{file_count} log files / {line_count} lines: {len(in_redis) + len(in_logs)} hits"
    )
    assert key_count > 10 and line_count > 1000, "the scan saw a real run"
    assert in_redis == []
    assert in_logs == []


# --------------------------------------------------------------------------- TLS Redis


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cacheship test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "server.pem", "server.key"))
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


def tls_redis_binary() -> str:
    """Debian's redis-server (built with TLS); scripts/setup installs it."""
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
    assert "v=" in version.stdout, version.stdout
    return found


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[ServerProcess, str, Path]]:
    """A Redis that speaks only TLS and wants a password: (server, password, CA file)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca_file, cert_file, key_file = _certificates(certs)
    password = "tls-pa55-" + uuid.uuid4().hex
    port = free_port()
    server = start_redis(
        port=port,
        password=password,
        binary=tls_redis_binary(),
        extra_args=(
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--tls-ca-cert-file",
            str(ca_file),
            "--tls-auth-clients",
            "no",
        ),
    )
    yield server, password, ca_file
    server.stop()


def test_redis_with_a_password_over_tls(
    tls_redis: tuple[ServerProcess, str, Path],
    s3_server: ServerProcess,
    workers: Callable[..., Worker],
    s3: Any,
    bucket: str,
    cache: SampleCache,
    source_root: Path,
    tmp_path: Path,
) -> None:
    server, password, ca_file = tls_redis
    url = (
        f"rediss://:{password}@{LOOPBACK}:{server.port}/0"
        f"?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"
    )
    # The server really wants TLS, the password and a client that checks its certificate.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=LOOPBACK, port=server.port, password=password, socket_timeout=3).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url.replace(password, "wrong")).ping()
    assert redis.Redis.from_url(url).ping()

    env = worker_env(url, s3_server.url, source_root)
    workers(env, concurrency=2)
    client = Client(url)
    result = client.wait(
        client.submit({"source": local(cache), "target": target(bucket)}), timeout=90
    )
    assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    logs = sorted(tmp_path.glob("*.log"))
    assert scan_files(logs, password)[2] == [], "the Redis password is never logged"
    key_count, _, hits = scan_redis(url, SECRET_KEY)
    assert key_count > 5 and hits == []


# --------------------------------------------------------------------------- HEAD 403


@pytest.fixture
def proxy(s3_server: ServerProcess) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.url, seed=403, max_seconds=300) as running:
        yield running


def test_head_403_for_missing_blobs_uploads_or_fails_as_configured(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
    source_root: Path,
) -> None:
    """What S3 does for a missing key when the caller has no s3:ListBucket right."""
    proxy.plan = FaultPlan(head_missing_status=403)
    base = worker_env(redis_server.url, proxy.url, source_root, CACHESHIP_PART_SIZE=str(5 * MiB))
    refusing = workers({**base, "CACHESHIP_S3_HEAD_FORBIDDEN": "fail"}, name="fail")
    with pytest.raises(ExportError) as failure:
        client.wait(client.submit({"source": local(cache), "target": target(bucket)}), timeout=60)
    message = str(failure.value)
    assert "writing layer sha256:" in message and "403 Forbidden" in message, message
    assert "CACHESHIP_S3_HEAD_FORBIDDEN" in message
    assert keys(s3, bucket) == []
    refusing.stop()

    workers({**base, "CACHESHIP_S3_HEAD_FORBIDDEN": "upload"}, name="upload")
    first = client.wait(
        client.submit({"source": local(cache), "target": target(bucket)}), timeout=60
    )
    assert first["layers_uploaded"] == len(cache.layers)
    assert_sound_cache(s3, bucket, first, cache, ["buildkit"])
    # Stored blobs answer HEAD as usual, so a second export skips them.
    again = client.wait(
        client.submit({"source": local(cache), "target": target(bucket)}), timeout=60
    )
    assert again["layers_skipped"] == len(cache.layers) and again["bytes_sent"] == 0
    assert proxy.stats.head_rewrites >= len(cache.layers)


def test_head_always_403_still_exports_in_upload_mode(
    redis_server: ServerProcess,
    proxy: FaultProxy,
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
    source_root: Path,
) -> None:
    """A store (or policy) that answers every HEAD with 403: nothing can be looked up."""
    proxy.plan = FaultPlan(head_status=403)
    env = worker_env(
        redis_server.url,
        proxy.url,
        source_root,
        CACHESHIP_PART_SIZE=str(5 * MiB),
        CACHESHIP_S3_HEAD_FORBIDDEN="upload",
    )
    workers(env, concurrency=2)
    total = sum(d.size for d in cache.layers)
    for _ in range(2):  # nothing is ever found, so every export uploads everything again
        result = client.wait(
            client.submit({"source": local(cache), "target": target(bucket)}), timeout=60
        )
        assert result["layers_uploaded"] == len(cache.layers)
        assert result["bytes_sent"] == total
        assert_sound_cache(s3, bucket, result, cache, ["buildkit"])
    assert proxy.stats.head_rewrites >= 2 * len(cache.layers)


def test_no_secret_in_any_log_of_this_test_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Runs last in its module: every worker log the session wrote so far is scanned."""
    logs = sorted(p for p in tmp_path_factory.getbasetemp().rglob("*.log") if p.is_file())
    files, lines, hits = scan_files(logs, SECRET_KEY)
    print(f"\nsession log scan: {files} files, {lines} lines, {len(hits)} hits")
    assert files > 0 and hits == []
