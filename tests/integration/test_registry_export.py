"""Exports from and to a real registry (distribution 2.8) with real workers.

Real Redis, a real S3 server over HTTP, real ``celery worker`` processes, a real registry;
faults come from the HTTP relay in front of the registry (tests/faultproxy.py). What the
registry holds is compared byte for byte with what BuildKit writes for the same cache (the
sample cache's manifest and config, which the local-layout tests hold to BuildKit's).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.backends.registry.verify import verify_registry_cache
from tasks.cacheformat import decode_manifest
from tasks.request import RegistrySpec
from tests.faultproxy import FaultPlan, FaultProxy, Request
from tests.integration.test_local_target import buildkit_layout, tree
from tests.registryserver import PASSWORD, USER, Registry, docker_config, running_registry
from tests.stack import Worker
from worker.client import Client, ExportError
from worker.embedded import ServerProcess
from worker.samplecache import SampleCache, write_layout, write_sample_cache

MiB = 1024 * 1024
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
)


@pytest.fixture
def registry() -> Iterator[Registry]:
    with running_registry("none") as running:
        yield running


@pytest.fixture
def dest_root(tmp_path: Path) -> Path:
    root = tmp_path / "nodes"
    root.mkdir()
    return root


def registry_env(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path, *hosts: str,
    **extra: str,
) -> dict[str, str]:
    return {
        **env,
        "CACHESHIP_SOURCE_ROOTS": f"{source_root},{dest_root}",
        "CACHESHIP_DEST_ROOTS": str(dest_root),
        "CACHESHIP_ALLOWED_REGISTRIES": ",".join(hosts),
        "CACHESHIP_REGISTRY_CHUNK_SIZE": str(1 * MiB),
        "DOCKER_CONFIG": str(tmp_path / "no-docker-config"),
        **extra,
    }


def reg(host: str, name: str, **attrs: Any) -> dict[str, Any]:
    return {"type": "registry", "ref": f"{host}/{name}", "registry.insecure": True, **attrs}


def manifest_of(registry: Registry, name: str, tag: str) -> bytes | None:
    answer = registry.get(f"/v2/{name}/manifests/{tag}", [f"repository:{name}:pull"],
                          headers={"Accept": ACCEPT})
    return answer.content if answer.status_code == 200 else None


def blob_of(registry: Registry, name: str, digest: str) -> bytes:
    answer = registry.get(f"/v2/{name}/blobs/{digest}", [f"repository:{name}:pull"])
    assert answer.status_code == 200, answer.text
    return answer.content


def assert_buildkit_exact(registry: Registry, name: str, tag: str, cache: SampleCache) -> None:
    """The tag names BuildKit's manifest for this cache, every blob byte for byte."""
    stored = manifest_of(registry, name, tag)
    expected = (cache.path / "blobs/sha256" / cache.manifest.digest[7:]).read_bytes()
    assert stored == expected
    for desc in (*cache.layers, cache.config):
        assert blob_of(registry, name, desc.digest) == (
            cache.path / "blobs/sha256" / desc.digest[7:]
        ).read_bytes()


def test_local_to_registry_to_s3_to_registry_to_local_is_byte_identical(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, bucket: str, s3: Any, registry: Registry,
) -> None:
    cache = write_sample_cache(
        source_root / "app", [3 * MiB, 1 * MiB, 200_000, 2 * MiB], seed=31, image_manifest=True
    )
    workers(registry_env(env, tmp_path, source_root, dest_root, registry.host), concurrency=2)
    local = {"type": "local", "src": str(cache.path)}
    pushed = client.wait(client.submit({"source": local, "target": reg(registry.host,
                                                                       "ci/app:main")}), 180)
    assert pushed["status"] == "complete" and pushed["ref"] == f"{registry.host}/ci/app:main"
    assert pushed["layers_uploaded"] == len(cache.layers)
    assert json.loads(pushed["cache.manifest"]) == json.loads(cache.manifest.to_json())
    assert_buildkit_exact(registry, "ci/app", "main", cache)
    snap = client.snapshot(client.submit({"source": local, "target": reg(registry.host,
                                                                         "ci/app:main")}))
    again = client.wait(snap.export_id, 120)
    assert again["layers_skipped"] == len(cache.layers) and again["bytes_sent"] == 0

    s3_spec = {"type": "s3", "bucket": bucket, "name": "app"}
    to_s3 = client.wait(client.submit({"source": reg(registry.host, "ci/app:main"),
                                       "target": s3_spec}), 180)
    assert to_s3["layers_uploaded"] == len(cache.layers)
    back = client.wait(client.submit({"source": s3_spec, "target": reg(registry.host,
                                                                       "ci/restored")}), 180)
    assert back["ref"] == f"{registry.host}/ci/restored:latest"
    assert_buildkit_exact(registry, "ci/restored", "latest", cache)

    node = dest_root / "node"
    done = client.wait(client.submit({"source": reg(registry.host, "ci/restored:latest"),
                                      "target": {"type": "local", "dest": str(node)}}), 180)
    assert done["status"] == "complete"
    assert tree(node) == buildkit_layout(cache)

    # Pinned by digest, as a source: the same cache.
    pinned = reg(registry.host, f"ci/restored@{cache.manifest.digest}")
    node2 = dest_root / "node2"
    client.wait(client.submit({"source": pinned, "target": {"type": "local",
                                                            "dest": str(node2)}}), 120)
    assert tree(node2) == buildkit_layout(cache)
    spec = RegistrySpec.model_validate(reg(registry.host, "ci/restored"))
    from tasks.backends.registry.client import RegistryClient

    report = verify_registry_cache(RegistryClient(registry.host, insecure=True), spec, deep=True)
    assert report.sound, report.problems
    assert sum(b.hashed for b in report.blobs) == len(cache.layers)


def test_index_and_docker_manifest_list_shapes(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, registry: Registry,
) -> None:
    cache = write_sample_cache(source_root / "app", [100_000, 50_000], seed=32)
    workers(registry_env(env, tmp_path, source_root, dest_root, registry.host))
    local = {"type": "local", "src": str(cache.path)}
    for attrs, media_type in (
        ({"image-manifest": False}, "application/vnd.oci.image.index.v1+json"),
        ({"oci-mediatypes": False},
         "application/vnd.docker.distribution.manifest.list.v2+json"),
    ):
        tag = "index" if "image-manifest" in attrs else "list"
        client.wait(client.submit({"source": local,
                                   "target": reg(registry.host, f"ci/app:{tag}", **attrs)}), 120)
        data = manifest_of(registry, "ci/app", tag)
        assert data is not None and json.loads(data)["mediaType"] == media_type
        contents = decode_manifest(data)
        assert [d.digest for d in contents.layers] == [d.digest for d in cache.layers]
        node = dest_root / tag
        client.wait(client.submit({"source": reg(registry.host, f"ci/app:{tag}"),
                                   "target": {"type": "local", "dest": str(node),
                                              **attrs}}), 120)
        assert (node / "blobs/sha256" / hashlib.sha256(data).hexdigest()).read_bytes() == data


def test_registry_to_registry_in_one_registry_moves_no_blob_bytes(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, registry: Registry,
) -> None:
    cache = write_sample_cache(source_root / "app", [3 * MiB, 2 * MiB, 300_000], seed=33,
                               image_manifest=True)
    with FaultProxy(registry.url, max_seconds=300) as relay:
        host = f"127.0.0.1:{relay.port}"
        workers(registry_env(env, tmp_path, source_root, dest_root, host))
        client.wait(client.submit({"source": {"type": "local", "src": str(cache.path)},
                                   "target": reg(host, "pr/app:pr-1")}), 120)
        pushed_bytes = relay.stats.bytes_up
        assert pushed_bytes >= sum(d.size for d in cache.layers)
        relay.stats.operations.clear()
        before = relay.stats.bytes_up
        promoted = client.wait(client.submit({"source": reg(host, "pr/app:pr-1"),
                                              "target": reg(host, "main/app:cache")}), 120)
        moved = relay.stats.bytes_up - before
        manifest = manifest_of(registry, "main/app", "cache")
        assert manifest is not None
        # Only the manifest itself went up: every blob (layers and config) was mounted.
        assert moved == len(manifest)
        assert promoted["layers_mounted"] == len(cache.layers) and promoted["bytes_sent"] == 0
        assert_buildkit_exact(registry, "main/app", "cache", cache)
        print(f"\nmount: pushed {pushed_bytes} bytes, promoted with {moved} bytes up "
              f"({relay.stats.operations['POST']} POSTs)")


def test_a_worker_killed_mid_chunked_upload_is_resumed_where_the_registry_stood(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, registry: Registry,
    redis_server: ServerProcess,
) -> None:
    import redis as redis_lib

    from tasks.backends.registry.upload import session_key

    cache = write_sample_cache(source_root / "one", [40 * MiB], seed=34, image_manifest=True)
    layer = cache.layers[0]
    redis = redis_lib.Redis.from_url(redis_server.url)
    chunk = 16 * MiB  # larger than what the kernel buffers between worker and relay
    with FaultProxy(registry.url, FaultPlan(bandwidth=4 * MiB), max_seconds=300) as relay:
        host = f"127.0.0.1:{relay.port}"
        worker_env = registry_env(env, tmp_path, source_root, dest_root, host,
                                  CACHESHIP_VISIBILITY_TIMEOUT="10",
                                  CACHESHIP_REGISTRY_CHUNK_SIZE=str(chunk))
        first = workers(worker_env, name="first", concurrency=1)
        export_id = client.submit({"source": {"type": "local", "src": str(cache.path)},
                                   "target": reg(host, "ci/big:main")})
        # Killed while sending a chunk: one is acknowledged and recorded, the second is on
        # its way (a chunk takes four seconds through the relay).
        key = session_key(host, "ci/big", layer.digest)
        deadline = time.monotonic() + 90
        while (raw := redis.get(key)) is None or json.loads(raw)["offset"] < chunk:
            assert time.monotonic() < deadline, "the upload never got a chunk in"
            time.sleep(0.02)
        time.sleep(1.0)
        first.kill_all()
        time.sleep(1.0)
        patches = relay.stats.operations["PATCH"]
        uploads = list((registry.root / "docker/registry/v2/repositories/ci/big/_uploads")
                       .glob("*/data"))
        assert len(uploads) == 1
        stood = uploads[0].stat().st_size
        assert stood == chunk  # the chunk cut mid-way never reached the registry
        relay.plan = FaultPlan()
        workers(worker_env, name="second", concurrency=1)
        result = client.wait(export_id, timeout=120, interval=0.2)
    assert result["bytes_resumed"] == stood
    assert result["bytes_sent"] == layer.size - stood
    assert_buildkit_exact(registry, "ci/big", "main", cache)
    print(f"\nresume: killed after {patches} PATCHes; the registry held {stood} bytes; "
          f"re-sent {result['bytes_sent']} of {layer.size}")


@pytest.mark.parametrize(("mode", "how"), [("htpasswd", "auths"), ("token", "auths"),
                                           ("token", "helper")])
def test_authenticated_registries_with_config_json_or_a_credential_helper(
    mode: str, how: str, env: dict[str, str], tmp_path: Path, source_root: Path,
    dest_root: Path, workers: Callable[..., Worker], client: Client,
    redis_server: ServerProcess,
) -> None:
    cache = write_sample_cache(source_root / "app", [200_000, 100_000], seed=35,
                               image_manifest=True)
    with running_registry(mode) as registry:
        extra: dict[str, str] = {}
        conf = tmp_path / "docker"
        if how == "helper":
            bin_dir = tmp_path / "bin"
            bin_dir.mkdir()
            script = bin_dir / "docker-credential-cacheship-test"
            script.write_text(
                "#!/bin/sh\nread server\n"
                f'printf \'{{"ServerURL":"%s","Username":"{USER}","Secret":"{PASSWORD}"}}\' '
                '"$server"\n'
            )
            script.chmod(script.stat().st_mode | stat.S_IXUSR)
            extra["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
            docker_config(conf, registry.host, helper="cacheship-test")
        else:
            docker_config(conf, registry.host)
        worker_env = {**registry_env(env, tmp_path, source_root, dest_root, registry.host),
                      "DOCKER_CONFIG": str(conf), **extra}
        worker = workers(worker_env)
        local = {"type": "local", "src": str(cache.path)}
        client.wait(client.submit({"source": local, "target": reg(registry.host, "ci/app")}),
                    120)
        assert_buildkit_exact(registry, "ci/app", "latest", cache)
        node = dest_root / "node"
        client.wait(client.submit({"source": reg(registry.host, "ci/app"),
                                   "target": {"type": "local", "dest": str(node)}}), 120)
        assert tree(node) == buildkit_layout(cache)
        # The password stays on the worker: not in its log, not in Redis (messages, results).
        assert PASSWORD not in worker.log()
        import redis as redis_lib

        store = redis_lib.Redis.from_url(redis_server.url)
        for key in store.scan_iter():
            kind = store.type(key)
            values = [store.get(key)] if kind == b"string" else (
                list(store.hgetall(key).values()) if kind == b"hash" else
                store.lrange(key, 0, -1) if kind == b"list" else []
            )
            assert all(PASSWORD.encode() not in (v or b"") for v in values), key


def test_a_config_over_one_mebibyte_is_refused_with_the_remedy(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, registry: Registry,
) -> None:
    small = write_sample_cache(source_root / "seed", [1000], seed=36)
    layer = small.layers[0]
    directory = source_root / "big"
    (directory / "blobs/sha256").mkdir(parents=True)
    (directory / "blobs/sha256" / layer.digest[7:]).write_bytes(
        (small.path / "blobs/sha256" / layer.digest[7:]).read_bytes()
    )
    created = "2026-01-01T00:00:00.123456789Z"
    records = [
        {"digest": "sha256:" + hashlib.sha256(f"r{i}".encode()).hexdigest(),
         "layers": [{"layer": 0, "createdAt": created}]}
        for i in range(11_500)
    ]
    annotations = {"mediaType": layer.media_type, "diffID": layer.annotations[
        "containerd.io/uncompressed"], "size": layer.size, "createdAt": created}
    _, _, config = write_layout(directory, {"layers": [{"blob": layer.digest, "parent": -1,
                                                         "annotations": annotations}],
                                             "records": records}, image_manifest=True)
    assert 1.4 * MiB < config.size < 1.7 * MiB
    workers(registry_env(env, tmp_path, source_root, dest_root, registry.host))
    with pytest.raises(ExportError) as refused:
        client.wait(client.submit({"source": {"type": "local", "src": str(directory)},
                                   "target": reg(registry.host, "ci/huge")}), 120)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{config.size} bytes, over the 1048576 bytes (1 MiB)" in message
    assert "mode=min" in message and "max_records" in message
    # Nothing written: not the tag, not a blob.
    assert manifest_of(registry, "ci/huge", "latest") is None
    assert not (registry.root / "docker/registry/v2/repositories/ci/huge").exists()


def test_bad_refs_unknown_tags_and_refusing_registries_fail_clearly_leaving_nothing(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, registry: Registry,
) -> None:
    from tasks.request import RequestError

    cache = write_sample_cache(source_root / "app", [300_000, 100_000], seed=37,
                               image_manifest=True)
    local = {"type": "local", "src": str(cache.path)}
    with pytest.raises(RequestError, match=r"target.ref: repository 'Bad/App' must be lower"):
        client.submit({"source": local, "target": reg(registry.host, "Bad/App")})

    failing: dict[str, tuple[int, str, list[tuple[str, str]]]] = {}

    def answer(request: Request) -> tuple[int, list[tuple[str, str]], bytes] | None:
        for path, (status, code, headers) in failing.items():
            if path in request.path:
                body = json.dumps({"errors": [{"code": code, "message": "injected"}]}).encode()
                return status, [("Content-Type", "application/json"), *headers], body
        return None

    with running_registry("htpasswd") as locked, FaultProxy(
        registry.url, FaultPlan(answer=answer), max_seconds=300
    ) as relay:
        host = f"127.0.0.1:{relay.port}"
        workers(registry_env(env, tmp_path, source_root, dest_root, host, locked.host,
                             CACHESHIP_COPY_MAX_RETRIES="1"))

        def fails(request: dict[str, Any]) -> str:
            with pytest.raises(ExportError) as failed:
                client.wait(client.submit(request), 120)
            message = str(failed.value)
            assert "\n" not in message
            return message

        said = fails({"source": reg(registry.host, "ci/none:nope"), "target": reg(host, "x")})
        assert "is not in CACHESHIP_ALLOWED_REGISTRIES" in said
        said = fails({"source": reg(host, "ci/none:nope"), "target": reg(host, "ci/t")})
        assert f"source.ref: {host}/ci/none:nope: the registry has no tag 'nope'" in said
        said = fails({"source": local, "target": reg(locked.host, "ci/t")})
        assert f"registry {locked.host} asked for credentials (HTTP 401)" in said
        assert "no credentials for" in said and "no-docker-config/config.json" in said
        assert not (locked.root / "docker/registry/v2/repositories/ci/t/_manifests").exists()

        for status, code, headers in ((429, "TOOMANYREQUESTS", [("Retry-After", "1")]),
                                      (500, "UNKNOWN", []), (404, "NAME_UNKNOWN", [])):
            failing.clear()
            failing["/blobs/uploads/"] = (status, code, headers)
            said = fails({"source": local, "target": reg(host, f"ci/f{status}")})
            assert f"HTTP {status}" in said and code in said, said
            assert manifest_of(registry, f"ci/f{status}", "latest") is None
        failing.clear()
        failing["/manifests/"] = (500, "UNKNOWN", [])
        said = fails({"source": local, "target": reg(host, "ci/m500")})
        assert "PUT manifest" in said or "HEAD manifest" in said
        failing.clear()
        assert manifest_of(registry, "ci/m500", "latest") is None


def test_builds_merged_into_one_tag_under_the_fleet_lock_and_verified_by_the_cli(
    env: dict[str, str], tmp_path: Path, source_root: Path, dest_root: Path,
    workers: Callable[..., Worker], client: Client, registry: Registry,
) -> None:
    import subprocess
    import sys

    from tasks.cacheformat import decode_config

    builds = [
        write_sample_cache(source_root / f"build-{n}", [120_000 + n * 1000, 50_000],
                           seed=200 + n, image_manifest=True)
        for n in range(3)
    ]
    worker_env = registry_env(env, tmp_path, source_root, dest_root, registry.host)
    workers(worker_env, name="merge-a", concurrency=2)
    workers(worker_env, name="merge-b", concurrency=2)
    target = reg(registry.host, "ci/app:main", merge=True)
    ids = [client.submit({"source": {"type": "local", "src": str(cache.path)},
                          "target": target}) for cache in builds]
    results = [client.wait(export_id, 180) for export_id in ids]
    merges = [r["merged"][0] for r in results]
    # One after another: each merge saw the ones before it.
    assert sorted(m["records_existing"] > 0 for m in merges) == [False, True, True]
    data = manifest_of(registry, "ci/app", "main")
    assert data is not None
    contents = decode_manifest(data)
    stored = {d.digest for d in contents.layers}
    for cache in builds:
        assert {d.digest for d in cache.layers} <= stored
    config = decode_config(blob_of(registry, "ci/app", contents.config.digest))
    keys = {record.digest for record in config.records}
    for n in range(3):
        step = "sha256:" + hashlib.sha256(f"step-{200 + n}-1".encode()).hexdigest()
        assert step in keys

    cacheship = str(Path(sys.executable).with_name("cacheship"))
    spec = f"type=registry,ref={registry.host}/ci/app:main,registry.insecure=true"
    verified = subprocess.run([cacheship, "verify", "--cache", spec, "--deep"], env=worker_env,
                              capture_output=True, text=True, timeout=120, check=False)
    assert verified.returncode == 0, verified.stderr
    assert f"--cache-from type=registry,ref={registry.host}/ci/app:main" in verified.stdout
    missing = subprocess.run(
        [cacheship, "verify", "--cache", spec.replace(":main", ":gone")], env=worker_env,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert missing.returncode != 0 and "MANIFEST_UNKNOWN" in missing.stderr + missing.stdout
