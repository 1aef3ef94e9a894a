"""A merge keeps blobs of the name it merges into: they are registered before it writes.

Real S3 server over HTTP and real Redis; the prune and the merge are the product's own
functions, interleaved at the one moment that matters: after the prune read the names and
before its first delete batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tasks.backends.local import source as local
from tasks.backends.s3.names import write_name
from tasks.backends.s3.prune import PruneOptions, PruneProgress, prune_cache
from tasks.fleet.inflight import acquire_prune, register, scope_of
from tasks.plan import ExportPlan, plan_export
from tasks.request import LocalSpec, S3Spec
from tasks.verify import verify_cache
from tests.integration.test_prune_domain import keys
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache


@pytest.fixture
def redis(redis_server: ServerProcess) -> Iterator[Any]:
    client = redis_lib.Redis.from_url(redis_server.url)
    yield client
    client.close()


def planned(tmp_path: Path, target: S3Spec, sizes: list[int], seed: int) -> tuple[ExportPlan, Path]:
    sample = write_sample_cache(tmp_path / f"cache-{seed}", sizes, seed=seed)
    return plan_export(local.load(LocalSpec(src=str(sample.path)), [tmp_path]), target), sample.path


def upload_layers(s3: Any, target: S3Spec, plan: ExportPlan, path: Path) -> set[str]:
    for layer in plan.layers:
        data = (path / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
        s3.put_object(Bucket=target.bucket, Key=target.blob_key(layer.digest), Body=data)
    return {target.blob_key(layer.digest) for layer in plan.layers}


@pytest.mark.parametrize("registers", [True, False], ids=["registered", "unregistered"])
def test_blobs_a_merge_pulls_in_survive_a_prune_running_beside_it(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any, tmp_path: Path, registers: bool
) -> None:
    """The stored name gained old blobs (rewritten by BuildKit's exporter, which registers
    nothing) after the prune read it; a merge then keeps them. Registered by the merge, they
    stay; without the registration (the old behaviour) the prune deletes them and the merged
    name dangles, which is what this test shows can happen."""
    target = S3Spec(
        bucket=bucket, name=["app"], merge="true", endpoint_url=s3_server.url,
        use_path_style=True,
    )
    first, first_path = planned(tmp_path, target, [2100, 2200], seed=1)
    reused, reused_path = planned(tmp_path, target, [2300, 2400, 2500], seed=2)
    new, new_path = planned(tmp_path, target, [2600, 2700], seed=3)
    upload_layers(s3, target, first, first_path)
    s3.put_object(Bucket=bucket, Key=target.manifest_key("app"), Body=first.s3_config)
    # Old blobs nobody references yet: BuildKit will reuse them without uploading.
    reused_keys = upload_layers(s3, target, reused, reused_path)
    time.sleep(1.1)  # grace 0s on a server clock with one-second steps
    scope = scope_of(target)
    pulled: list[str] = []

    def merge_now(progress: PruneProgress) -> None:
        if progress.phase != "deleting blobs" or progress.done or pulled:
            return
        # BuildKit's exporter found the reused blobs stored and rewrote the name.
        s3.put_object(Bucket=bucket, Key=target.manifest_key("app"), Body=reused.s3_config)
        # A cacheship export merging into it: its own layers are stored and registered.
        upload_layers(s3, target, new, new_path)
        register(redis, scope, "export-1", [d.digest for d in new.layers], ttl=600)

        def on_pull(digests: list[str]) -> None:
            pulled.extend(digests)
            if registers:
                register(redis, scope, "export-1", digests, ttl=600)

        write = write_name(s3, redis, target, "app", new.s3_config, on_pull=on_pull)
        assert write.merged

    with acquire_prune(redis, scope) as guard:
        report = prune_cache(s3, target, guard, PruneOptions(grace=0), on_progress=merge_now)

    assert set(pulled) == {d.digest for d in reused.layers}
    after = keys(s3, bucket)
    if registers:
        assert report.ok, report.problems
        assert reused_keys <= after
        assert report.blobs_kept_in_flight >= len(reused_keys)
        assert verify_cache(s3, target, deep=True).sound
    else:
        assert not reused_keys & after
        assert not verify_cache(s3, target).sound
