"""Local sources: symlinks swapped in while reading, hard links, and enormous caches.

Real files and, for the enormous caches, a real worker: a request steers what the workers
open, so what is opened is checked after opening (tasks/backends/local/source.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.backends.local import source as local
from tasks.backends.source import SourceError
from tasks.request import LocalSpec
from tests.stack import Worker
from worker.client import Client, ExportError
from worker.samplecache import write_sample_cache

SECRET = b"outside the source roots: never to be read by a worker\n"


def test_a_symlink_swapped_in_while_blobs_are_opened_never_reads_outside(
    tmp_path: Path,
) -> None:
    """``blobs/sha256`` is replaced by a link out of the root and put back, over and over,
    while the worker's code opens a blob: every read is the cache's own bytes.

    (Checking the path first and opening it after, as this code did before, read the
    outside file about one time in ten here.)
    """
    root, outside = tmp_path / "root", tmp_path / "outside"
    cache = write_sample_cache(root / "app", [50_000], seed=190)
    digest = cache.layers[0].digest
    hexpart = digest.removeprefix("sha256:")
    inside_bytes = (cache.path / "blobs" / "sha256" / hexpart).read_bytes()
    (outside / "sha256").mkdir(parents=True)
    (outside / "sha256" / hexpart).write_bytes(SECRET)
    spec = LocalSpec(src=str(cache.path))
    shas, kept = cache.path / "blobs" / "sha256", cache.path / "blobs" / "kept"

    stop = threading.Event()
    flips = 0

    def flip() -> None:
        nonlocal flips
        while not stop.is_set():
            shas.rename(kept)
            shas.symlink_to(outside / "sha256")
            time.sleep(0.0005)
            shas.unlink()
            kept.rename(shas)
            flips += 1
            time.sleep(0.0005)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    reads, refusals, leaked = 0, 0, 0
    deadline = time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            try:
                with local.open_blob(spec, [root], digest) as stream:
                    data = stream.read()
            except SourceError as exc:
                # Out of the root, or caught between the two renames.
                reasons = ("leads out of the allowed directories", "missing", "was moved")
                assert any(reason in str(exc) for reason in reasons), exc
                refusals += 1
                continue
            reads += 1
            if data != inside_bytes:
                leaked += 1
    finally:
        stop.set()
        flipper.join(5)
    print(f"\n{flips} flips: {reads} reads of the cache's bytes, {refusals} refusals")
    assert flips > 100 and reads > 0 and refusals > 0, "the race was really run"
    assert leaked == 0


def test_a_blob_reached_through_a_directory_link_out_of_the_cache_is_refused(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    cache = write_sample_cache(root / "app", [40_000], seed=192)
    digest = cache.layers[0].digest
    real_blobs = cache.path / "blobs"
    shutil.copytree(real_blobs, outside)  # the same cache, but outside the roots
    (outside / "sha256" / digest.removeprefix("sha256:")).write_bytes(SECRET)
    real_blobs.rename(cache.path / "kept")
    real_blobs.symlink_to(outside)
    spec = LocalSpec(src=str(cache.path))
    with pytest.raises(SourceError, match=r"blob sha256:.*: leads out of the allowed"):
        local.open_blob(spec, [root], digest).close()
    with pytest.raises(SourceError, match=r"leads out of the allowed directories"):
        local.load(spec, [root])


def test_hard_links_are_refused_inside_and_out(tmp_path: Path) -> None:
    """A hard link has no path that leads out: any file with a second link is refused."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    cache = write_sample_cache(root / "app", [30_000, 20_000], seed=193)
    spec = LocalSpec(src=str(cache.path))
    first, second = (d.digest for d in cache.layers)
    secret = outside / "credentials"
    secret.write_bytes(SECRET)
    blob = cache.path / "blobs" / "sha256" / first.removeprefix("sha256:")
    blob.unlink()
    os.link(secret, blob)  # a file outside the roots, given a name inside
    with pytest.raises(SourceError, match=r"has 2 hard links; a cache file must be a file"):
        local.open_blob(spec, [root], first).close()
    with pytest.raises(SourceError, match=r"layer sha256:.*: has 2 hard links"):
        local.check_blobs(spec, [root], cache.layers)
    # A second name for the cache's own blob is refused the same way: nothing tells the two
    # apart once the link exists.
    own = cache.path / "blobs" / "sha256" / second.removeprefix("sha256:")
    os.link(own, tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="hard links"):
        local.open_blob(spec, [root], second).close()
    (tmp_path / "elsewhere").unlink()
    with local.open_blob(spec, [root], second) as stream:
        assert hashlib.sha256(stream.read()).hexdigest() == second.removeprefix("sha256:")


def test_index_json_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    cache = write_sample_cache(root / "app", [10_000], seed=194)
    (outside / "index.json").write_bytes((cache.path / "index.json").read_bytes())
    (cache.path / "index.json").unlink()
    (cache.path / "index.json").symlink_to(outside / "index.json")
    with pytest.raises(SourceError, match=r"index\.json: is a symbolic link"):
        local.load(LocalSpec(src=str(cache.path)), [root])


# --------------------------------------------------------------------------- huge caches


def huge_cache(directory: Path, layers: int) -> None:
    """index.json and a manifest naming ``layers`` layers (their files are never needed:
    the cache must be refused before any layer is looked at)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    entries = ",".join(
        '{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",'
        f'"digest":"sha256:{i:064x}","size":1048576}}'
        for i in range(layers)
    )
    config = "sha256:" + "c" * 64
    manifest = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"application/vnd.buildkit.cacheconfig.v0",'
        f'"digest":"{config}","size":2}},"layers":[{entries}]}}'
    ).encode()
    digest = hashlib.sha256(manifest).hexdigest()
    (blobs / digest).write_bytes(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{digest}",
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_cache_of_a_million_layers_is_refused_within_the_memory_budget(
    env: dict[str, str],
    workers: Callable[..., Worker],
    client: Client,
    s3: Any,
    bucket: str,
    source_root: Path,
) -> None:
    """Refused, not copied: a million layers would be a million tasks, Flower rows and
    progress steps. Two bounds decide before anything is planned: metadata over 64 MiB is
    not read (a million layers need about 150 MB of manifest), and a cache whose manifest
    fits but names more than CACHESHIP_MAX_LAYERS layers is refused once it is parsed."""
    million, many = source_root / "million", source_root / "many"
    huge_cache(million, 1_000_000)
    huge_cache(many, 300_000)
    worker = workers({**env, "CACHESHIP_MAX_LAYERS": "20000"}, concurrency=1)
    idle = peak_rss_mib(worker.proc.pid)

    began = time.monotonic()
    with pytest.raises(ExportError) as failure:
        request = {"source": {"type": "local", "src": str(million)},
                   "target": {"type": "s3", "bucket": bucket}}
        client.wait(client.submit(request), timeout=120)
    million_seconds = time.monotonic() - began
    assert "larger than 67108864 bytes" in str(failure.value)
    assert "index.json manifest sha256:" in str(failure.value)

    began = time.monotonic()
    with pytest.raises(ExportError) as failure:
        request = {"source": {"type": "local", "src": str(many)},
                   "target": {"type": "s3", "bucket": bucket}}
        client.wait(client.submit(request), timeout=120)
    many_seconds = time.monotonic() - began
    assert (
        "source: the cache has 300000 layers, more than CACHESHIP_MAX_LAYERS (20000); "
        "nothing was copied"
    ) in str(failure.value)
    peak = peak_rss_mib(worker.proc.pid)
    print(
        f"\nworker peak RSS: {idle:.0f} MiB idle, {peak:.0f} MiB after refusing a 1,000,000-"
        f"layer cache in {million_seconds:.1f} s and a 300,000-layer one in "
        f"{many_seconds:.1f} s"
    )
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0, "nothing written"
    assert peak - idle < 768, "refusing stays within the worker's memory budget"
