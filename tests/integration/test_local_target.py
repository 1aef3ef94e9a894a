"""Exports into a local directory with real workers: restore from S3, copy between disks.

Real Redis, a real S3 server over HTTP, real ``celery worker`` processes. What lands in the
directory is compared, file by file, with the layout BuildKit's ``--cache-to type=local``
writes for the same cache (``docs/buildkit-cache-format.md`` section 6, and the sample
writer the other tests treat as BuildKit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.request import LocalSpec
from tasks.verify import verify_local_cache
from tests.stack import Worker
from worker.client import Client, ExportError
from worker.samplecache import SampleCache, write_sample_cache

MiB = 1024 * 1024
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF = "org.opencontainers.image.ref.name"


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory``: file bytes, or None for a directory."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


def buildkit_layout(cache: SampleCache, tag: str = "latest") -> dict[str, bytes | None]:
    """What ``--cache-to type=local,dest=DIR`` leaves for this cache (index.json by hand)."""
    expected: dict[str, bytes | None] = {
        "blobs": None,
        "blobs/sha256": None,
        "ingest": None,
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": (
            '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
            f'"manifests":[{{"mediaType":"{MANIFEST}","digest":"{cache.manifest.digest}",'
            f'"size":{cache.manifest.size},"annotations":{{"{REF}":"{tag}"}}}}]}}'
        ).encode(),
    }
    for blob in (*cache.layers, cache.config, cache.manifest):
        hexpart = blob.digest.removeprefix("sha256:")
        expected[f"blobs/sha256/{hexpart}"] = (cache.path / "blobs/sha256" / hexpart).read_bytes()
    return expected


@pytest.fixture
def dest_root(tmp_path: Path) -> Path:
    root = tmp_path / "nodes"
    root.mkdir()
    return root


@pytest.fixture
def local_env(env: dict[str, str], source_root: Path, dest_root: Path) -> dict[str, str]:
    # A directory a worker wrote is a source for the next export: both roots are readable.
    return {
        **env,
        "CACHESHIP_SOURCE_ROOTS": f"{source_root},{dest_root}",
        "CACHESHIP_DEST_ROOTS": str(dest_root),
    }


@pytest.fixture
def cache(source_root: Path) -> SampleCache:
    # BuildKit's local exporter writes an OCI image manifest by default.
    return write_sample_cache(
        source_root / "app", [3 * MiB, 1 * MiB, 200_000, 9 * MiB], seed=11, image_manifest=True
    )


def test_restore_from_s3_then_copy_between_disks_writes_buildkits_layout(
    local_env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    bucket: str,
    dest_root: Path,
    cache: SampleCache,
) -> None:
    workers(local_env, concurrency=2)
    s3 = {"type": "s3", "bucket": bucket, "name": "app"}
    client.wait(
        client.submit({"source": {"type": "local", "src": str(cache.path)}, "target": s3}),
        timeout=180,
    )

    node = dest_root / "node-1"
    restore_id = client.submit({"source": s3, "target": {"type": "local", "dest": str(node)}})
    restored = client.wait(restore_id, timeout=180)
    assert restored["status"] == "complete"
    assert restored["layers_uploaded"] == len(cache.layers)
    assert restored["bytes_sent"] == sum(d.size for d in cache.layers)
    assert json.loads(restored["cache.manifest"]) == json.loads(cache.manifest.to_json())
    assert restored["names"] == [str(node / "index.json")]
    assert tree(node) == buildkit_layout(cache)

    # Progress reads as for S3: BuildKit's step names, every step's task finished.
    snap = client.snapshot(restore_id)
    assert snap.state == "SUCCESS"
    names = [s.name for s in snap.steps]
    assert names[:-2] == [f"writing layer {d.digest}" for d in cache.layers]
    assert names[-2:] == [
        f"writing config {cache.config.digest}",
        f"writing cache image manifest {cache.manifest.digest}",
    ]
    assert {s.state for s in snap.steps if s.kind == "layer"} == {"SUCCESS"}

    # The restored directory is a source: copied to another disk, byte for byte the same.
    copy = dest_root / "node-2"
    copied = client.wait(
        client.submit(
            {
                "source": {"type": "local", "src": str(node)},
                "target": {"type": "local", "dest": str(copy), "tag": "latest"},
            }
        ),
        timeout=180,
    )
    assert copied["cache.manifest"] == restored["cache.manifest"]
    assert tree(copy) == tree(node)
    assert verify_local_cache(copy, LocalSpec(src=str(copy)), deep=True).sound

    # Warming a node that already holds the cache copies nothing and rewrites index.json
    # with the same bytes.
    again = client.wait(
        client.submit({"source": s3, "target": {"type": "local", "dest": str(node)}}),
        timeout=180,
    )
    assert again["layers_skipped"] == len(cache.layers) and again["bytes_sent"] == 0
    assert tree(node) == buildkit_layout(cache)


def test_a_corrupt_source_blob_fails_and_leaves_the_directory_as_it_was(
    local_env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    source_root: Path,
    dest_root: Path,
    cache: SampleCache,
) -> None:
    workers(local_env, concurrency=2)
    node = dest_root / "node"
    client.wait(
        client.submit(
            {
                "source": {"type": "local", "src": str(cache.path)},
                "target": {"type": "local", "dest": str(node)},
            }
        ),
        timeout=180,
    )
    before = tree(node)

    other = write_sample_cache(source_root / "other", [2 * MiB, 300_000], seed=12)
    bad = other.layers[0]
    path = other.path / "blobs/sha256" / bad.digest.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    path.write_bytes(bytes(data))
    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(other.path)},
            "target": {"type": "local", "dest": str(node)},
        }
    )
    with pytest.raises(ExportError) as failure:
        client.wait(export_id, timeout=180)
    assert bad.digest in str(failure.value) and "does not match" in str(failure.value)
    assert not (node / "blobs/sha256" / bad.digest.removeprefix("sha256:")).exists()
    # The other layer of the failed export may have landed (a blob nobody references, as
    # BuildKit leaves them); the cache BuildKit would import is unchanged.
    after = tree(node)
    assert after["index.json"] == before["index.json"]
    assert {k: v for k, v in after.items() if k in before} == before
    assert list((node / "ingest").iterdir()) == []


def test_a_destination_outside_the_roots_is_refused_before_anything_is_written(
    local_env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    tmp_path: Path,
    cache: SampleCache,
) -> None:
    workers(local_env, concurrency=1)
    outside = tmp_path / "elsewhere"
    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(cache.path)},
            "target": {"type": "local", "dest": str(outside)},
        }
    )
    with pytest.raises(ExportError, match=r"target\.dest: outside the allowed destination roots"):
        client.wait(export_id, timeout=120)
    assert not outside.exists()


def _started(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def test_a_sigkilled_worker_leaves_only_temporary_files_that_the_next_run_removes(
    local_env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    source_root: Path,
    dest_root: Path,
) -> None:
    big = write_sample_cache(source_root / "big", [160 * MiB], seed=13, image_manifest=True)
    layer = big.layers[0]
    env = {**local_env, "CACHESHIP_VISIBILITY_TIMEOUT": "10"}
    first = workers(env, name="first", concurrency=1)
    node = dest_root / "node"
    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(big.path)},
            "target": {"type": "local", "dest": str(node)},
        }
    )
    ingest = node / "ingest"
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the copy never started"
        if any(_started(p) for p in ingest.glob("cacheship-*")):
            break
        time.sleep(0.002)
    first.kill_all()
    leftovers = sorted(ingest.iterdir())
    assert leftovers, "the killed copy left its temporary file"
    assert all(p.name.startswith("cacheship-") for p in leftovers)
    assert not (node / "blobs/sha256" / layer.digest.removeprefix("sha256:")).exists()
    assert not (node / "index.json").exists()
    assert all(0 < p.stat().st_size < layer.size for p in leftovers)

    workers(env, name="second", concurrency=1)
    result = client.wait(export_id, timeout=300, interval=0.2)
    assert result["status"] == "complete"
    assert list(ingest.iterdir()) == []
    assert tree(node) == buildkit_layout(big)


def test_overlapping_exports_into_one_directory_keep_both_tags(
    local_env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    source_root: Path,
    dest_root: Path,
    cache: SampleCache,
) -> None:
    workers(local_env, name="a", concurrency=2)
    workers(local_env, name="b", concurrency=2)
    other = write_sample_cache(
        source_root / "other", [5 * MiB, 700_000], seed=14, image_manifest=True
    )
    node = dest_root / "shared"
    ids = [
        client.submit(
            {
                "source": {"type": "local", "src": str(sample.path)},
                "target": {"type": "local", "dest": str(node), "tag": tag},
            }
        )
        for sample, tag in ((cache, "main"), (other, "pr-9"), (cache, "release"))
    ]
    results = [client.wait(export_id, timeout=240) for export_id in ids]
    assert {r["status"] for r in results} == {"complete"}
    entries = json.loads((node / "index.json").read_bytes())["manifests"]
    assert {e["annotations"][REF]: e["digest"] for e in entries} == {
        "main": cache.manifest.digest,
        "pr-9": other.manifest.digest,
        "release": cache.manifest.digest,
    }
    assert list((node / "ingest").iterdir()) == []
    assert not (node / "index.json.lock").exists()
    for tag in ("main", "pr-9", "release"):
        spec = LocalSpec(src=str(node), tag=tag)
        assert verify_local_cache(node, spec, deep=True).sound, tag
