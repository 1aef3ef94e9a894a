"""The export pipeline end to end: real Redis, real S3 server over HTTP, real workers."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.cacheformat import decode_config, decode_manifest, descriptors_from_annotations
from tests.stack import Worker
from worker.client import Client, ExportError
from worker.samplecache import SampleCache, write_sample_cache

MiB = 1024 * 1024


def _target(bucket: str, **attrs: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, **attrs}


def _body(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _keys(s3: Any, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def assert_sound_cache(
    s3: Any,
    bucket: str,
    result: dict[str, Any],
    cache: SampleCache,
    names: list[str],
    prefix: str = "",
) -> bytes:
    """Read the bucket back with plain boto3 and check it the way BuildKit would."""
    manifests = [_body(s3, bucket, f"{prefix}manifests/{n}") for n in names]
    assert all(m == manifests[0] for m in manifests), "every name holds the same config"
    config = decode_config(manifests[0])
    descriptors = descriptors_from_annotations(config)
    assert {d.digest for d in cache.layers} == set(descriptors)
    for layer in cache.layers:
        blob = _body(s3, bucket, f"{prefix}blobs/{layer.digest}")
        assert len(blob) == layer.size
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
        stored = descriptors[layer.digest]
        assert (
            stored.annotations["containerd.io/uncompressed"]
            == (layer.annotations["containerd.io/uncompressed"])
        )
    manifest_desc = json.loads(result["cache.manifest"])
    manifest = _body(s3, bucket, f"{prefix}blobs/{manifest_desc['digest']}")
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == manifest_desc["digest"]
    assert len(manifest) == manifest_desc["size"]
    contents = decode_manifest(manifest)
    config_blob = _body(s3, bucket, f"{prefix}blobs/{contents.config.digest}")
    assert "sha256:" + hashlib.sha256(config_blob).hexdigest() == contents.config.digest
    assert [d.digest for d in contents.layers] == [d.digest for d in cache.layers]
    return manifests[0]


@pytest.fixture
def cache(source_root: Path) -> SampleCache:
    return write_sample_cache(source_root / "app", [3 * MiB, 1 * MiB, 200_000, 12 * MiB], seed=7)


def test_local_export_then_warm_then_touch_then_s3_copy(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
) -> None:
    workers(env, concurrency=2)
    source = {"type": "local", "src": str(cache.path)}
    names = ["main", "pr-1"]

    first = client.wait(
        client.submit({"source": source, "target": _target(bucket, name=names)}), timeout=120
    )
    total = sum(d.size for d in cache.layers)
    assert first["layers_uploaded"] == len(cache.layers)
    assert first["bytes_sent"] == total
    written = assert_sound_cache(s3, bucket, first, cache, names)

    again = client.wait(
        client.submit({"source": source, "target": _target(bucket, name=names)}), timeout=120
    )
    assert again["bytes_sent"] == 0
    assert again["layers_skipped"] == len(cache.layers)
    assert again["cache.manifest"] == first["cache.manifest"]

    touched = client.wait(
        client.submit(
            {"source": source, "target": _target(bucket, name=names, touch_refresh="0s")}
        ),
        timeout=120,
    )
    assert touched["layers_touched"] == len(cache.layers)
    assert touched["bytes_sent"] == 0

    copied = client.wait(
        client.submit(
            {
                "source": _target(bucket, name=names),
                "target": _target(bucket, name=names, prefix="mirror/"),
            }
        ),
        timeout=120,
    )
    assert copied["layers_uploaded"] == len(cache.layers)
    assert assert_sound_cache(s3, bucket, copied, cache, names, prefix="mirror/") == written


def test_corrupt_blob_fails_naming_the_layer_and_writes_nothing_under_it(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    cache: SampleCache,
) -> None:
    bad = max(cache.layers, key=lambda d: d.size)
    path = cache.path / "blobs" / "sha256" / bad.digest.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    workers({**env, "CACHESHIP_PART_SIZE": str(5 * MiB)}, concurrency=2)

    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(cache.path)},
            "target": _target(bucket, name="main"),
        }
    )
    with pytest.raises(ExportError) as failure:
        client.wait(export_id, timeout=120)
    assert bad.digest in str(failure.value)
    assert "does not match" in str(failure.value)
    keys = _keys(s3, bucket)
    assert f"blobs/{bad.digest}" not in keys
    assert not [k for k in keys if k.startswith("manifests/")]
    assert _open_uploads(s3, bucket) == []
    assert client.snapshot(export_id).state == "FAILURE"


def test_progress_of_a_running_layer_is_readable_from_redis(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    big = write_sample_cache(source_root / "big", [96 * MiB], seed=3)
    layer = big.layers[0]
    workers(
        {**env, "CACHESHIP_PART_SIZE": str(5 * MiB), "CACHESHIP_PROGRESS_INTERVAL": "0.02"},
        concurrency=1,
    )
    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(big.path)},
            "target": _target(bucket, upload_parallelism=1),
        }
    )
    seen: list[int] = []
    listed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        snap = client.snapshot(export_id)
        step = next((s for s in snap.steps if s.digest == layer.digest), None)
        if step is not None:
            listed = True
            meta = client.app.backend.get_task_meta(step.task_id)
            if meta["status"] == "PROGRESS":
                assert meta["result"]["step"] == f"writing layer {layer.digest}"
                assert meta["result"]["bytes_total"] == layer.size
                seen.append(meta["result"]["bytes_done"])
        if snap.ready:
            break
        time.sleep(0.01)
    assert listed, "the export's metadata lists the layer step with its task id"
    assert client.wait(export_id, timeout=5)["status"] == "complete"
    partial = sorted({b for b in seen if 0 < b < layer.size})
    assert len(partial) >= 2, f"bytes advanced while copying: {seen[:20]}"
    assert seen == sorted(seen)
