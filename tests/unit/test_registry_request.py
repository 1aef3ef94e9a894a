"""type=registry in requests and in buildx's key=value form: BuildKit's defaults and refusals."""

from __future__ import annotations

import pytest

from tasks.request import (
    RegistrySpec,
    RequestError,
    parse_request,
    parse_spec,
    parse_target,
    request_schema,
)

DIGEST = "sha256:" + "cd" * 32


def test_buildkit_defaults() -> None:
    spec = parse_target("type=registry,ref=ghcr.io/org/app:buildcache")
    assert isinstance(spec, RegistrySpec)
    assert (spec.oci_mediatypes, spec.image_manifest, spec.registry_insecure) == (True, True, False)
    assert spec.merges is False


def test_oci_mediatypes_false_means_a_docker_manifest_list() -> None:
    spec = parse_target("type=registry,ref=h.io/a,oci-mediatypes=false")
    assert isinstance(spec, RegistrySpec)
    assert (spec.oci_mediatypes, spec.image_manifest) == (False, False)
    spec = parse_target("type=registry,ref=h.io/a,image-manifest=false")
    assert isinstance(spec, RegistrySpec)
    assert (spec.oci_mediatypes, spec.image_manifest) == (True, False)


def test_image_manifest_without_oci_mediatypes_is_refused_as_buildkit_refuses_it() -> None:
    with pytest.raises(RequestError, match="target: image-manifest=true needs oci-mediatypes"):
        parse_target("type=registry,ref=h.io/a,image-manifest=true,oci-mediatypes=false")


def test_attributes_of_buildx() -> None:
    spec = parse_target(
        "type=registry,ref=h.io/a:t,mode=max,compression=gzip,compression-level=3,"
        "ignore-error=true,registry.insecure=true,merge=true,max_records=50,max_age=14d"
    )
    assert isinstance(spec, RegistrySpec)
    assert spec.registry_insecure and spec.ignore_error and spec.merges
    assert (spec.mode, spec.max_records, spec.max_age) == ("max", 50, 14 * 86400.0)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("type=registry", "target.ref: required"),
        ("type=registry,ref=h.io/Bad/N", "target.ref: repository 'Bad/N' must be lower-case"),
        (f"type=registry,ref=h.io/a@{DIGEST}", "target.ref: a target is pushed by tag"),
        ("type=registry,ref=h.io/a,compression=zstd", "target.compression"),
        ("type=registry,ref=h.io/a,max_records=5", "max_records only applies with merge"),
        ("type=registry,ref=h.io/a,password=x", "credentials are not accepted"),
        ("type=registry,ref=h.io/a,bucket=b", "target.bucket: unknown attribute"),
    ],
)
def test_bad_targets_are_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(RequestError, match=says.replace("(", r"\(")):
        parse_target(text)


def test_a_source_may_pin_a_digest_and_is_never_merged_into() -> None:
    spec = parse_spec(f"type=registry,ref=h.io/a@{DIGEST}", "source")
    assert isinstance(spec, RegistrySpec)
    assert spec.reference.digest == DIGEST
    target = {"type": "registry", "ref": "h.io/b"}
    with pytest.raises(RequestError, match=r"source\.merge: only a target"):
        parse_request({"source": {"type": "registry", "ref": "h.io/a", "merge": True},
                       "target": target})
    with pytest.raises(RequestError, match=r"target\.ref: a target is pushed by tag"):
        parse_request({"source": target, "target": {"type": "registry",
                                                   "ref": f"h.io/b@{DIGEST}"}})


def test_json_requests_and_the_schema_know_registries() -> None:
    req = parse_request(
        {
            "source": {"type": "s3", "bucket": "bkt"},
            "target": {"type": "registry", "ref": "h.io/a", "registry.insecure": True},
        }
    )
    assert isinstance(req.target, RegistrySpec) and req.target.registry_insecure
    dumped = req.target.model_dump(mode="json", by_alias=True)
    assert dumped["registry.insecure"] is True
    assert RegistrySpec.model_validate(dumped) == req.target
    schema = request_schema()
    assert "RegistrySpec" in schema["$defs"]
