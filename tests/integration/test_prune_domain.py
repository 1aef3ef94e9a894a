"""``tasks.backends.s3.prune`` against a real S3 server over HTTP and a real Redis (no workers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tasks.backends.local import source as local
from tasks.backends.s3.prune import PruneError, PruneOptions, PruneProgress, prune_cache
from tasks.backends.s3.publish import put_blob, put_names
from tasks.fleet.inflight import acquire_prune, register, registered, release, scope_of
from tasks.plan import ExportPlan, plan_export
from tasks.request import LocalSpec, S3Spec
from tasks.verify import verify_cache
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache


@pytest.fixture
def redis(redis_server: ServerProcess) -> Iterator[Any]:
    client = redis_lib.Redis.from_url(redis_server.url)
    yield client
    client.close()


def spec_for(bucket: str, s3_server: ServerProcess, names: list[str]) -> S3Spec:
    return S3Spec(
        bucket=bucket, name=names, endpoint_url=s3_server.url, use_path_style=True
    )


def export_sample(
    s3: Any, tmp_path: Path, target: S3Spec, sizes: list[int], seed: int
) -> ExportPlan:
    """What an export writes: layers, config blob, manifest blob, then the names."""
    sample = write_sample_cache(tmp_path / f"cache-{seed}", sizes, seed=seed)
    plan = plan_export(local.load(LocalSpec(src=str(sample.path)), [tmp_path]), target)
    for layer in plan.layers:
        data = (sample.path / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
        s3.put_object(Bucket=target.bucket, Key=target.blob_key(layer.digest), Body=data)
    put_blob(s3, target, plan.config_desc, plan.config)
    put_blob(s3, target, plan.manifest_desc, plan.manifest)
    put_names(s3, target, plan.s3_config)
    return plan


def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def garbage(s3: Any, target: S3Spec, count: int) -> set[str]:
    found = set()
    for i in range(count):
        key = target.blob_key(f"sha256:{i + 1:064x}")
        s3.put_object(Bucket=target.bucket, Key=key, Body=b"x" * (i + 1))
        found.add(key)
    return found


def run(redis: Any, s3: Any, spec: S3Spec, **options: Any) -> Any:
    with acquire_prune(redis, scope_of(spec)) as guard:
        return prune_cache(s3, spec, guard, PruneOptions(**options))


def test_unreferenced_blobs_and_stale_uploads_go_referenced_stay(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any, tmp_path: Path
) -> None:
    target = spec_for(bucket, s3_server, ["app"])
    plan = export_sample(s3, tmp_path, target, [4000, 5000, 6000], seed=1)
    junk = garbage(s3, target, 25)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=target.blob_key(f"sha256:{'e' * 64}"))
    other = s3.put_object(Bucket=bucket, Key=f"{target.blobs_prefix}team/notes.txt", Body=b"x")
    assert other
    before = keys(s3, bucket)
    time.sleep(1.1)  # the server's clock has one-second steps
    seen: list[PruneProgress] = []
    with acquire_prune(redis, scope_of(target)) as guard:
        report = prune_cache(
            s3, target, guard, PruneOptions(grace=0, batch_size=7), on_progress=seen.append
        )
    after = keys(s3, bucket)
    assert report.ok, report.problems
    assert before - after == junk
    assert report.blobs_removed == 25
    assert report.bytes_freed == sum(range(1, 26))
    assert report.blobs_kept_referenced == len(plan.layers) + 2
    assert report.other_keys == 1
    assert report.names_kept == ["app"]
    assert report.uploads_aborted == 1
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert target.blob_key(plan.config_desc.digest) in after
    assert target.blob_key(plan.manifest_desc.digest) in after
    assert verify_cache(s3, target, deep=True).sound
    assert [p.phase for p in seen][-1] == "done"
    assert any(p.phase == "deleting blobs" and p.done == 25 for p in seen)
    assert upload["UploadId"]


def test_the_grace_period_keeps_young_blobs(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any
) -> None:
    target = spec_for(bucket, s3_server, ["app"])
    junk = garbage(s3, target, 3)
    report = run(redis, s3, target, grace=3600)
    assert report.blobs_removed == 0 and report.blobs_kept_recent == 3
    assert junk <= keys(s3, bucket)


def test_an_expired_names_exclusive_blobs_go_shared_ones_stay(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any, tmp_path: Path
) -> None:
    keep = spec_for(bucket, s3_server, ["release/v1"])
    drop = spec_for(bucket, s3_server, ["feature-x"])
    kept_plan = export_sample(s3, tmp_path, keep, [3000, 3100], seed=5)
    # The same first layer sizes and seed → shares its layers; one more layer of its own.
    dropped_plan = export_sample(s3, tmp_path, drop, [3000, 3100, 3200], seed=5)
    shared = {d.digest for d in kept_plan.layers} & {d.digest for d in dropped_plan.layers}
    exclusive = {d.digest for d in dropped_plan.layers} - shared
    assert shared and exclusive
    time.sleep(1.1)
    report = run(redis, s3, keep, grace=0, expire_names=0, keep_names=("release/*",))
    after = keys(s3, bucket)
    assert report.ok, report.problems
    assert report.names_removed == ["feature-x"]
    assert report.names_kept == ["release/v1"]
    assert keep.manifest_key("feature-x") not in after
    for digest in shared:
        assert keep.blob_key(digest) in after
    for digest in exclusive:
        assert keep.blob_key(digest) not in after
    assert keep.blob_key(dropped_plan.config_desc.digest) not in after
    assert keep.blob_key(kept_plan.manifest_desc.digest) in after
    assert verify_cache(s3, keep, deep=True).sound


def test_a_corrupt_name_stops_everything_and_is_reported(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any, tmp_path: Path
) -> None:
    target = spec_for(bucket, s3_server, ["good"])
    export_sample(s3, tmp_path, target, [2000], seed=2)
    junk = garbage(s3, target, 4)
    s3.put_object(Bucket=bucket, Key=target.manifest_key("broken"), Body=b'{"layers": [')
    before = keys(s3, bucket)
    time.sleep(1.1)
    report = run(redis, s3, target, grace=0, expire_names=0, keep_names=("broken", "good"))
    assert keys(s3, bucket) == before
    assert not report.ok
    assert [p.name for p in report.unreadable] == ["broken"]
    assert "does not parse" in report.unreadable[0].message
    assert report.blobs_removed == 0 and report.names_removed == []
    assert junk <= before


def test_a_dry_run_reports_what_a_real_run_then_does(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any, tmp_path: Path
) -> None:
    target = spec_for(bucket, s3_server, ["one"])
    export_sample(s3, tmp_path, target, [1500, 2500], seed=3)
    export_sample(s3, tmp_path, spec_for(bucket, s3_server, ["two"]), [1700], seed=4)
    garbage(s3, target, 6)
    before = keys(s3, bucket)
    time.sleep(1.1)
    dry = run(redis, s3, target, grace=0, expire_names=0, keep_names=("one",), dry_run=True)
    assert keys(s3, bucket) == before
    real = run(redis, s3, target, grace=0, expire_names=0, keep_names=("one",))
    assert len(before) - len(keys(s3, bucket)) == real.blobs_removed + len(real.names_removed)
    for field in ("names_removed", "blobs_removed", "bytes_freed", "uploads_aborted"):
        assert getattr(dry, field) == getattr(real, field), field
    assert real.names_removed == ["two"] and real.blobs_removed == 6 + 1 + 2


def test_registered_digests_survive_a_prune(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any
) -> None:
    target = spec_for(bucket, s3_server, ["app"])
    junk = sorted(garbage(s3, target, 5))
    in_flight = [key.rsplit("/", 1)[1] for key in junk[:2]]
    register(redis, scope_of(target), "export-1", in_flight, ttl=600)
    time.sleep(1.1)
    report = run(redis, s3, target, grace=0)
    after = keys(s3, bucket)
    assert set(junk[:2]) <= after and not set(junk[2:]) & after
    assert report.blobs_kept_in_flight == 2 and report.blobs_removed == 3
    release(redis, scope_of(target), "export-1")
    assert registered(redis, scope_of(target)) == set()


def test_overlapping_prefixes_are_refused_before_anything_is_read(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any
) -> None:
    target = S3Spec(bucket=bucket, blobs_prefix="c/", manifests_prefix="c/m/")
    with pytest.raises(PruneError, match="overlap"):
        run(redis, s3, target)


def test_a_name_written_again_during_the_prune_stops_it(
    s3: Any, bucket: str, s3_server: ServerProcess, redis: Any, tmp_path: Path
) -> None:
    """An expired name rewritten after the listing is not old: nothing is deleted."""
    target = spec_for(bucket, s3_server, ["app"])
    export_sample(s3, tmp_path, target, [2200], seed=9)
    garbage(s3, target, 3)
    time.sleep(1.1)
    body = s3.get_object(Bucket=bucket, Key=target.manifest_key("app"))["Body"].read()

    def rewrite(progress: PruneProgress) -> None:
        if progress.phase == "deleting names":
            time.sleep(1.1)  # a later Last-Modified, on a clock of one-second steps
            s3.put_object(Bucket=bucket, Key=target.manifest_key("app"), Body=body + b" ")

    before = keys(s3, bucket)
    with acquire_prune(redis, scope_of(target)) as guard:
        report = prune_cache(
            s3, target, guard, PruneOptions(grace=0, expire_names=0), on_progress=rewrite
        )
    assert keys(s3, bucket) == before
    assert not report.ok and "written again" in report.problems[0]
    assert report.names_removed == [] and report.blobs_removed == 0
