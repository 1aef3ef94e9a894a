"""What counts as a cache name when prune looks at a whole bucket (``tasks.backends.s3.roots``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.backends.local import source as local
from tasks.backends.s3.roots import NotAName, classify, is_blob_key
from tasks.cacheformat import FormatError
from tasks.plan import ExportPlan, plan_export
from tasks.request import LocalSpec, S3Spec
from worker.samplecache import write_sample_cache


def planned(tmp_path: Path, oci: bool = False, image: bool = False) -> ExportPlan:
    sample = write_sample_cache(tmp_path / "cache", [300, 500, 700])
    target = S3Spec(bucket="cache-bucket", **{"oci-mediatypes": oci, "image-manifest": image})
    return plan_export(local.load(LocalSpec(src=str(sample.path)), [tmp_path]), target)


def test_a_cache_config_name_keeps_its_layers_and_small_blobs(tmp_path: Path) -> None:
    plan = planned(tmp_path)
    kind, refs = classify(plan.s3_config)
    assert kind == "config"
    assert {d.digest for d in plan.layers} | {plan.config_desc.digest} <= refs
    assert plan.manifest_desc.digest in refs


@pytest.mark.parametrize(("oci", "image"), [(False, False), (True, False), (True, True)])
def test_a_cache_manifest_as_a_name_keeps_its_layers_and_config(
    tmp_path: Path, oci: bool, image: bool
) -> None:
    plan = planned(tmp_path, oci, image)
    kind, refs = classify(plan.manifest)
    assert kind == "manifest"
    assert refs == {d.digest for d in plan.layers} | {plan.config_desc.digest}


def test_an_index_pointing_at_a_stored_cache_image_manifest_is_a_root(tmp_path: Path) -> None:
    plan = planned(tmp_path, True, True)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [json.loads(plan.manifest_desc.to_json())],
        }
    ).encode()
    asked: list[str] = []

    def read_blob(digest: str) -> bytes | None:
        asked.append(digest)
        return plan.manifest if digest == plan.manifest_desc.digest else None

    kind, refs = classify(index, read_blob)
    assert asked == [plan.manifest_desc.digest]
    assert kind == "manifest"
    assert refs == {d.digest for d in plan.layers} | {
        plan.config_desc.digest, plan.manifest_desc.digest
    }
    # The same index whose manifest is not stored there points at nothing known.
    with pytest.raises(NotAName):
        classify(index)


@pytest.mark.parametrize(
    "data",
    [
        b"plain text",
        b"\x1f\x8b\x08\x00gzip",
        b'{"retries": 3}',
        b"[1, 2, 3]",
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'
        + b"a" * 64
        + b'","size":3},"layers":[]}',
        b'{"broken json": ',
    ],
    ids=["text", "gzip", "json", "array", "image", "bad-json"],
)
def test_objects_that_are_not_names(data: bytes) -> None:
    with pytest.raises(NotAName):
        classify(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"layers":[{"blob":"sha256:',
        b'{"layers":[{"blob":"not a digest","parent":-1}],"records":[]}',
        b'{"LAYERS": 7}',
        b'{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.buildkit.cacheconfig.v0",'
        b'"digest":"sha256:short","size":1}]}',
        b'{"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":'
        b'"application/vnd.buildkit.cacheconfig.v0"',
    ],
    ids=["cut-config", "bad-digest", "folded-key", "bad-manifest", "cut-manifest"],
)
def test_would_be_names_that_do_not_parse_are_errors(data: bytes) -> None:
    with pytest.raises(FormatError):
        classify(data)


def test_blob_keys_are_content_addressed_keys_under_any_prefix() -> None:
    assert is_blob_key("blobs/sha256:" + "a" * 64)
    assert is_blob_key("team/blobs/sha256:" + "a" * 64)
    assert not is_blob_key("manifests/main")
    assert not is_blob_key("sha256/notes.txt")
