"""Many builds, one cache name: exports with merge=true through real workers, Redis and S3."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.cacheformat import decode_config, descriptors_from_annotations
from tests.stack import Worker
from worker.client import Client, ExportError
from worker.samplecache import SampleCache, write_sample_cache

CACHESHIP = str(Path(sys.executable).with_name("cacheship"))
BUILDS = 5


def _step_keys(seed: int, layers: int) -> set[str]:
    """The record digests write_sample_cache gives build ``seed`` (one per step)."""
    return {
        "sha256:" + hashlib.sha256(f"step-{seed}-{i}".encode()).hexdigest() for i in range(layers)
    }


def _stored(s3: Any, bucket: str, name: str = "main") -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=f"manifests/{name}")["Body"].read())


def _builds(source_root: Path) -> list[SampleCache]:
    return [
        write_sample_cache(source_root / f"build-{n}", [150_000 + n * 1000, 60_000], seed=100 + n)
        for n in range(BUILDS)
    ]


def _export(client: Client, cache: SampleCache, target: dict[str, Any]) -> str:
    return client.submit({"source": {"type": "local", "src": str(cache.path)}, "target": target})


def test_five_builds_exported_at_once_all_land_in_one_name(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    builds = _builds(source_root)
    workers(env, name="merge-a", concurrency=3)
    workers(env, name="merge-b", concurrency=3)
    target = {"type": "s3", "bucket": bucket, "name": "main", "merge": True}
    ids = [_export(client, cache, target) for cache in builds]
    results = [client.wait(export_id, timeout=600) for export_id in ids]

    assert all(r["status"] == "complete" for r in results)
    config = decode_config(_stored(s3, bucket))
    stored_layers = set(descriptors_from_annotations(config))
    for cache in builds:
        assert {d.digest for d in cache.layers} <= stored_layers
    keys = {record.digest for record in config.records}
    for n, cache in enumerate(builds):
        assert _step_keys(100 + n, len(cache.layers)) <= keys
    # The merges happened one after another: each saw the ones before it.
    merges = [r["merged"][0] for r in results]
    assert all(m["name"] == "main" and m["merged"] for m in merges)
    assert sorted(m["records_existing"] > 0 for m in merges) == [False] + [True] * (BUILDS - 1)
    assert len({m["records_after"] for m in merges}) == BUILDS
    assert max(m["records_after"] for m in merges) == len(config.records)

    verified = subprocess.run(
        [CACHESHIP, "verify", "--cache", f"type=s3,bucket={bucket},name=main", "--deep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    blobs = sum(len(cache.layers) for cache in builds)
    assert f"sha256   {blobs} blobs read back and hashed" in verified.stdout


def test_without_merge_the_last_export_overwrites_the_name(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    first, second = _builds(source_root)[:2]
    workers(env, concurrency=2)
    target = {"type": "s3", "bucket": bucket, "name": "main"}
    client.wait(_export(client, first, target), timeout=300)
    result = client.wait(_export(client, second, target), timeout=300)
    assert "merged" not in result
    config = decode_config(_stored(s3, bucket))
    assert set(descriptors_from_annotations(config)) == {d.digest for d in second.layers}
    assert not _step_keys(100, len(first.layers)) & {r.digest for r in config.records}


def test_merge_into_a_corrupt_name_fails_and_leaves_it(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    cache = _builds(source_root)[0]
    corrupt = b'{"layers":[{"blob":"sha256:1234"}]}'
    s3.put_object(Bucket=bucket, Key="manifests/main", Body=corrupt)
    workers(env, concurrency=2)
    target = {"type": "s3", "bucket": bucket, "name": "main", "merge": True}
    with pytest.raises(ExportError, match=r"name 'main' \(manifests/main\) holds no valid"):
        client.wait(_export(client, cache, target), timeout=300)
    assert _stored(s3, bucket) == corrupt

    replaced = client.wait(_export(client, cache, {**target, "merge": "replace-invalid"}), 300)
    assert replaced["merged"][0]["replaced_invalid"] is True
    config = decode_config(_stored(s3, bucket))
    assert set(descriptors_from_annotations(config)) == {d.digest for d in cache.layers}
    assert json.loads(replaced["cache.manifest"])["size"] > 0
