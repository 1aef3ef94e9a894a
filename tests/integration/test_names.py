"""Merging into one cache name against a real S3 server (moto) and a real Redis server.

Writers race in threads; each guard (the Redis lock, the conditional PUT) is also shown to
keep every export on its own.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest
import redis

from tasks.backends.s3.names import PutOutcome, put_if_unchanged, read_name, write_name, write_names
from tasks.backends.target import InvalidStoredConfigError
from tasks.cacheformat import (
    decode_config,
    descriptors_from_annotations,
    marshal,
    parse_graph,
    s3_config_bytes,
)
from tasks.request import S3Spec
from tests.faultproxy import FaultPlan, FaultProxy, Request
from tests.stack import s3_client
from worker.embedded import ServerProcess, start_redis

BASE_KEY = "sha256:" + "ba" * 32


def _blob(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _export(s3: Any, bucket: str, n: int, day: int = 10) -> bytes:
    """The S3 form of build ``n``: a base record every build shares, and one of its own.

    Its layer blobs are stored in the bucket, as a finished export has them.
    """
    layers: list[dict[str, Any]] = []
    for data in (b"base layer", f"layer of build {n}".encode()):
        digest = _blob(data)
        s3.put_object(Bucket=bucket, Key=f"blobs/{digest}", Body=data)
        layers.append(
            {
                "blob": digest,
                "parent": -1 if not layers else 0,
                "annotations": {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "diffID": _blob(b"diff " + data),
                    "size": len(data),
                    "createdAt": "2026-01-01T00:00:00Z",
                },
            }
        )
    records = [
        {"digest": BASE_KEY, "layers": [{"layer": 0, "createdAt": "2026-01-01T00:00:00Z"}]},
        {
            "digest": "sha256:" + hashlib.sha256(f"key {n}".encode()).hexdigest(),
            "inputs": [[{"selector": "", "link": 0}]],
            "layers": [{"layer": 1, "createdAt": f"2026-01-{day:02d}T00:00:{n % 60:02d}Z"}],
        },
    ]
    cfg = decode_config(json.dumps({"layers": layers, "records": records}))
    return s3_config_bytes(marshal(parse_graph(cfg, descriptors_from_annotations(cfg))))


def _target(bucket: str, **extra: Any) -> S3Spec:
    return S3Spec.model_validate({"bucket": bucket, "name": "main", "merge": True, **extra})


def _stored(s3: Any, bucket: str, name: str = "main") -> Any:
    found = read_name(s3, bucket, f"manifests/{name}")
    assert found is not None
    return decode_config(found[0])


def _race(count: int, write: Any) -> list[Any]:
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = write(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


@pytest.fixture
def redis_client(redis_server: ServerProcess) -> Any:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _keys_of(cfg: Any) -> set[str]:
    return {record.digest for record in cfg.records}


def _own_keys(count: int) -> set[str]:
    return {"sha256:" + hashlib.sha256(f"key {n}".encode()).hexdigest() for n in range(count)}


@pytest.mark.parametrize("conditional", [True, False], ids=["lock+condition", "lock-alone"])
def test_racing_merges_keep_every_export(
    s3: Any, bucket: str, redis_client: Any, conditional: bool
) -> None:
    count = 6
    exports = [_export(s3, bucket, n) for n in range(count)]
    target = _target(bucket)
    writes = _race(
        count,
        lambda i: write_name(s3, redis_client, target, "main", exports[i], conditional=conditional),
    )
    stored = _stored(s3, bucket)
    assert _keys_of(stored) == _own_keys(count) | {BASE_KEY}
    assert len(stored.layers) == count + 1
    assert all(w.merged and w.conditional is conditional for w in writes)
    assert sorted(w.counts.records_after for w in writes) == list(range(2, count + 2))


def test_a_store_refusing_conditions_gets_plain_writes_under_the_lock(
    s3_server: ServerProcess, bucket: str, redis_client: Any
) -> None:
    """501 NotImplemented to every conditional PUT, as stores without the feature answer."""

    def conditional_put(request: Request) -> bool:
        return request.method == "PUT" and bool(
            request.header("If-Match") or request.header("If-None-Match")
        )

    plan = FaultPlan(error_rate=1.0, errors=("notimplemented",), match=conditional_put)
    with FaultProxy(s3_server.url, plan, max_seconds=600) as proxy:
        s3 = s3_client(proxy.url)
        count = 4
        exports = [_export(s3, bucket, n) for n in range(count)]
        target = _target(bucket)
        writes = _race(count, lambda i: write_name(s3, redis_client, target, "main", exports[i]))
        refused = proxy.stats.faults_by_operation["NotImplemented PutObject"]
    assert _keys_of(_stored(s3_client(s3_server.url), bucket)) == _own_keys(count) | {BASE_KEY}
    assert not any(w.conditional for w in writes)
    assert all("refuses conditional writes" in w.note for w in writes)
    # The probe met the refusal once; the merges then sent no condition.
    assert refused == 1


def test_conditional_writes_alone_keep_every_export(s3: Any, bucket: str) -> None:
    """Two fleets with their own Redis: no shared lock, only the store's conditions."""
    servers = [start_redis(), start_redis()]
    clients = [redis.Redis.from_url(server.url) for server in servers]
    try:
        count = 6
        exports = [_export(s3, bucket, n) for n in range(count)]
        target = _target(bucket)
        writes = _race(
            count,
            lambda i: write_name(s3, clients[i % 2], target, "main", exports[i], max_attempts=50),
        )
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
    assert _keys_of(_stored(s3, bucket)) == _own_keys(count) | {BASE_KEY}
    assert all(w.conditional for w in writes)


def test_a_stale_etag_or_a_new_name_loses_the_race(s3: Any, bucket: str) -> None:
    key = "manifests/main"
    assert put_if_unchanged(s3, bucket, key, b"first", None) is PutOutcome.WRITTEN
    found = read_name(s3, bucket, key)
    assert found is not None
    etag = found[1]
    assert put_if_unchanged(s3, bucket, key, b"second", None) is PutOutcome.LOST_RACE
    assert put_if_unchanged(s3, bucket, key, b"second", etag) is PutOutcome.WRITTEN
    assert put_if_unchanged(s3, bucket, key, b"third", etag) is PutOutcome.LOST_RACE
    second = read_name(s3, bucket, key)
    assert second is not None and second[0] == b"second"
    s3.delete_object(Bucket=bucket, Key=key)
    assert put_if_unchanged(s3, bucket, key, b"fourth", second[1]) is PutOutcome.LOST_RACE
    assert read_name(s3, bucket, key) is None


def test_stored_layers_gone_from_the_bucket_are_dropped(
    s3: Any, bucket: str, redis_client: Any
) -> None:
    target = _target(bucket)
    write_name(s3, redis_client, target, "main", _export(s3, bucket, 1))
    gone = _blob(b"layer of build 1")
    s3.delete_object(Bucket=bucket, Key=f"blobs/{gone}")
    write = write_name(s3, redis_client, target, "main", _export(s3, bucket, 2))
    stored = _stored(s3, bucket)
    assert _keys_of(stored) == _own_keys(3) - _own_keys(2) | {BASE_KEY}
    assert gone not in {layer.blob for layer in stored.layers}
    assert write.counts is not None
    assert (write.counts.results_missing, write.counts.records_pruned) == (1, 1)


def test_max_records_bounds_the_name(s3: Any, bucket: str, redis_client: Any) -> None:
    target = _target(bucket, max_records=3)
    for n in range(5):
        last = write_name(s3, redis_client, target, "main", _export(s3, bucket, n, day=n + 1))
    stored = _stored(s3, bucket)
    # The base record and the two newest builds.
    assert _keys_of(stored) == (_own_keys(5) - _own_keys(3)) | {BASE_KEY}
    assert last.counts is not None and last.counts.results_over_limit == 1


@pytest.mark.parametrize("body", [b"not json at all", b'{"layers":[{"blob":"sha256:00"}]}'])
def test_an_invalid_stored_config_is_left_alone_unless_replacing_is_asked(
    s3: Any, bucket: str, redis_client: Any, body: bytes
) -> None:
    s3.put_object(Bucket=bucket, Key="manifests/main", Body=body)
    new = _export(s3, bucket, 1)
    with pytest.raises(InvalidStoredConfigError, match=r"^name 'main' \(manifests/main\)"):
        write_name(s3, redis_client, _target(bucket), "main", new)
    assert s3.get_object(Bucket=bucket, Key="manifests/main")["Body"].read() == body
    write = write_name(s3, redis_client, _target(bucket, merge="replace-invalid"), "main", new)
    assert write.replaced_invalid
    assert s3.get_object(Bucket=bucket, Key="manifests/main")["Body"].read() == new


def test_without_merge_the_last_writer_wins(s3: Any, bucket: str) -> None:
    target = S3Spec.model_validate({"bucket": bucket, "name": "main;other"})
    write_names(s3, None, target, _export(s3, bucket, 1))
    second = _export(s3, bucket, 2)
    writes = write_names(s3, None, target, second)
    for name in ("main", "other"):
        assert s3.get_object(Bucket=bucket, Key=f"manifests/{name}")["Body"].read() == second
    assert [w.merged for w in writes] == [False, False]
