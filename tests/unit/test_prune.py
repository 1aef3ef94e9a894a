"""The pure parts of prune: what a name references, name globs, layouts, scopes, clocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.backends.local import source as local
from tasks.backends.s3.prune import (
    PruneError,
    _server_now,
    check_globs,
    check_layout,
    is_kept_name,
    name_references,
)
from tasks.cacheformat import decode_config
from tasks.fleet.inflight import _keys, scope_of
from tasks.plan import plan_export
from tasks.request import LocalSpec, S3Spec, parse_go_duration
from worker.samplecache import write_sample_cache


@pytest.mark.parametrize(
    ("oci", "image"), [(False, False), (True, False), (True, True)], ids=["docker", "oci", "image"]
)
def test_a_name_references_what_its_export_wrote(tmp_path: Path, oci: bool, image: bool) -> None:
    """Layers, config blob and manifest blob of a planned export, from the name alone."""
    sample = write_sample_cache(tmp_path / "cache", [300, 500, 700, 900])
    target = S3Spec(bucket="cache-bucket", **{"oci-mediatypes": oci, "image-manifest": image})
    plan = plan_export(local.load(LocalSpec(src=str(sample.path)), [tmp_path]), target)
    refs = name_references(decode_config(plan.s3_config))
    assert {layer.digest for layer in plan.layers} <= refs
    assert plan.config_desc.digest in refs
    assert plan.manifest_desc.digest in refs
    # Nothing else: four layers, one config blob, three manifest flavours.
    assert len(refs) == len(plan.layers) + 1 + 3


def test_a_name_without_annotations_still_references_its_layers() -> None:
    config = decode_config(
        b'{"layers":[{"blob":"sha256:' + b"a" * 64 + b'","parent":-1}],'
        b'"records":[{"digest":"sha256:' + b"b" * 64 + b'","layers":[{"layer":0}]}]}'
    )
    assert name_references(config) >= {"sha256:" + "a" * 64}


def test_keep_globs_match_whole_names() -> None:
    assert is_kept_name("release/v1", ["release/*"])
    assert is_kept_name("main", ["dev", "main"])
    assert not is_kept_name("feature-main", ["main"])
    assert not is_kept_name("anything", [])
    assert is_kept_name("a/b/c", ["a/*"])  # fnmatch: * crosses '/'


@pytest.mark.parametrize("glob", ["", "bad\nglob"])
def test_unusable_keep_globs_are_refused(glob: str) -> None:
    with pytest.raises(PruneError, match="--keep-names"):
        check_globs([glob])


@pytest.mark.parametrize(
    ("blobs", "manifests"), [("", "manifests/"), ("cache/", "cache/names/"), ("x/", "x/")]
)
def test_overlapping_prefixes_are_refused(blobs: str, manifests: str) -> None:
    spec = S3Spec(bucket="cache-bucket", blobs_prefix=blobs, manifests_prefix=manifests)
    with pytest.raises(PruneError, match="overlap"):
        check_layout(spec)


def test_default_layout_is_accepted() -> None:
    check_layout(S3Spec(bucket="cache-bucket", prefix="team/"))


def test_scope_is_bucket_and_blob_prefix_not_endpoint_or_name() -> None:
    a = S3Spec(bucket="b-one", prefix="p/", name=["x"], endpoint_url="http://a:1")
    b = S3Spec(bucket="b-one", prefix="p/", name=["y"], endpoint_url="http://b:2")
    assert scope_of(a) == scope_of(b) == "b-one/p/blobs/"
    assert scope_of(S3Spec(bucket="b-one", prefix="q/")) != scope_of(a)
    assert scope_of(S3Spec(bucket="b-two", prefix="p/")) != scope_of(a)


def test_every_key_of_a_scope_shares_one_cluster_slot() -> None:
    keys = _keys("bucket/prefix/blobs/")
    tags = {key.split("{", 1)[1].split("}", 1)[0] for key in keys.values()}
    assert len(tags) == 1
    assert _keys("other/blobs/")["lock"] != keys["lock"]


def test_grace_is_measured_on_the_servers_clock() -> None:
    response = {"ResponseMetadata": {"HTTPHeaders": {"date": "Tue, 01 Dec 2026 02:00:00 GMT"}}}
    now = _server_now(response)
    assert (now.year, now.month, now.day, now.hour, now.minute) == (2026, 12, 1, 2, 0)
    assert _server_now({}).year >= 2025


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("0s", 0), ("1h30m", 5400)])
def test_durations_are_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["1d", "-1h", "h", "12"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_go_duration(text)
