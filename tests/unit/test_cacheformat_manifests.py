"""Cache manifests: Docker manifest list, OCI index, OCI image manifest, and reading them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from tasks.cacheformat import (
    ANNOTATION_CREATED_AT,
    ANNOTATION_UNCOMPRESSED,
    MAX_IMPORT_BLOB_SIZE,
    MEDIA_TYPE_CACHE_CONFIG,
    CacheGraph,
    Descriptor,
    FormatError,
    GoTime,
    ManifestContents,
    Marshalled,
    config_descriptor,
    convert_layer,
    decode_manifest,
    encode_config,
    layer_media_type,
    manifest_bytes,
    marshal,
)

OCI = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = OCI + "+gzip"
OCI_ZSTD = OCI + "+zstd"
OCI_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_GZIP = DOCKER + ".gzip"
DOCKER_ZSTD = DOCKER + ".zstd"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


@pytest.mark.parametrize(
    ("docker", "oci"),
    [
        (DOCKER, OCI),
        (DOCKER_GZIP, OCI_GZIP),
        (DOCKER_ZSTD, OCI_ZSTD),
        (DOCKER_FOREIGN, OCI_NONDIST),
        (DOCKER_FOREIGN + ".gzip", OCI_NONDIST + "+gzip"),
    ],
)
def test_media_types_convert_both_ways(docker: str, oci: str) -> None:
    assert layer_media_type(docker, oci=True) == oci
    assert layer_media_type(oci, oci=True) == oci
    assert layer_media_type(oci, oci=False) == docker
    assert layer_media_type(docker, oci=False) == docker


def test_unknown_media_types_pass_through() -> None:
    for media_type in ("", "x/y", OCI_NONDIST + "+zstd"):
        assert layer_media_type(media_type, oci=False) == media_type
    assert layer_media_type("x/y", oci=True) == "x/y"
    d = Descriptor(DOCKER_GZIP, dg(1), 1, {"a": "b"})
    assert convert_layer(d, oci=True) == Descriptor(OCI_GZIP, dg(1), 1, {"a": "b"})


def cache() -> tuple[Marshalled, Descriptor]:
    t = GoTime.parse("2024-01-01T00:00:00Z")
    base = Descriptor(
        DOCKER_GZIP,
        dg(11),
        100,
        {ANNOTATION_UNCOMPRESSED: dg(21), ANNOTATION_CREATED_AT: "2024-01-01T00:00:00Z"},
    )
    top = Descriptor(OCI_ZSTD, dg(12), 200, {ANNOTATION_UNCOMPRESSED: dg(22)})
    g = CacheGraph()
    g.add_record(dg(1), results=[(t, [base, top, base])])  # the base blob is used twice
    m = marshal(g)
    return m, config_descriptor(encode_config(m.config))


def descriptor_json(d: Descriptor, media_type: str) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": d.digest, "size": d.size}
    if d.annotations:
        out["annotations"] = dict(sorted(d.annotations.items()))
    return out


@pytest.mark.parametrize(
    ("oci", "list_type", "base_type", "top_type"),
    [(False, DOCKER_LIST, DOCKER_GZIP, DOCKER_ZSTD), (True, OCI_INDEX, OCI_GZIP, OCI_ZSTD)],
)
def test_manifest_list_and_index(oci: bool, list_type: str, base_type: str, top_type: str) -> None:
    m, config = cache()
    data, descriptor = manifest_bytes(m, config, oci_mediatypes=oci, image_manifest=False)
    base, top = m.layers
    # One entry per config layer, in config order (the base blob's two entries included).
    blobs = [layer.blob for layer in m.config.layers]
    assert blobs == [dg(11), dg(11), dg(12)]
    entries = [
        descriptor_json(base, base_type),
        descriptor_json(base, base_type),
        descriptor_json(top, top_type),
        descriptor_json(config, MEDIA_TYPE_CACHE_CONFIG),
    ]
    expected = {"schemaVersion": 2, "mediaType": list_type, "manifests": entries}
    assert data == json.dumps(expected, separators=(",", ":")).encode()
    assert descriptor == Descriptor(
        list_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
    )
    assert decode_manifest(data) == ManifestContents(
        config, [convert_layer(d, oci=oci) for d in (base, base, top)]
    )


def test_image_manifest() -> None:
    m, config = cache()
    data, descriptor = manifest_bytes(m, config, oci_mediatypes=True, image_manifest=True)
    base, top = m.layers
    expected = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor_json(config, MEDIA_TYPE_CACHE_CONFIG),
        "layers": [
            descriptor_json(base, OCI_GZIP),
            descriptor_json(base, OCI_GZIP),
            descriptor_json(top, OCI_ZSTD),
        ],
    }
    assert data == json.dumps(expected, separators=(",", ":")).encode()
    assert descriptor.media_type == OCI_MANIFEST
    assert descriptor.size == len(data)
    assert descriptor.to_json() == json.dumps(
        {"mediaType": OCI_MANIFEST, "digest": descriptor.digest, "size": len(data)},
        separators=(",", ":"),
    )
    assert decode_manifest(data) == ManifestContents(config, [base, base, top])


def test_image_manifest_needs_oci_media_types() -> None:
    m, config = cache()
    with pytest.raises(FormatError, match="OCI mediatypes are required"):
        manifest_bytes(m, config, oci_mediatypes=False, image_manifest=True)


def test_decode_reads_what_buildkit_infers() -> None:
    m, config = cache()
    layer = m.layers[0]
    # No mediaType: the keys tell a list from a manifest.
    listed = {"manifests": [layer.to_go(), config.to_go()]}
    assert decode_manifest(json.dumps(listed).encode()) == ManifestContents(config, [layer])
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": config.to_go(),
        "layers": [layer.to_go()],
    }
    assert decode_manifest(json.dumps(manifest).encode()) == ManifestContents(config, [layer])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "manifest: expected an object, got array"),
        ({"manifests": [], "layers": []}, "invalid ambiguous manifest and manifest list"),
        ({"mediaType": OCI_INDEX, "config": {}}, "does not match manifest contents"),
        ({"mediaType": OCI_MANIFEST, "manifests": []}, "does not match manifest contents"),
        ({"manifests": []}, "not a cache manifest: no descriptor of media type"),
        (
            {
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": dg(1),
                    "size": 1,
                },
                "layers": [],
            },
            "config.mediaType: not a cache manifest",
        ),
        (
            {"manifests": [{"mediaType": OCI, "digest": "sha256:1", "size": 1}]},
            "manifests[0].digest: digest must be sha256",
        ),
        (
            {"manifests": [{"mediaType": OCI, "digest": dg(1), "size": -5}]},
            "manifests[0].size: size must not be negative",
        ),
        (
            {
                "manifests": [
                    {"mediaType": OCI, "digest": dg(1), "size": 1, "annotations": {"a": 1}}
                ]
            },
            "manifests[0].annotations['a']: expected a string",
        ),
        (
            {"manifests": [{"mediaType": MEDIA_TYPE_CACHE_CONFIG, "digest": dg(1), "size": 2**21}]},
            "manifests[0].size: cache config is too large",
        ),
    ],
)
def test_decode_refusals(value: Any, expected: str) -> None:
    with pytest.raises(FormatError) as caught:
        decode_manifest(json.dumps(value).encode(), max_size=MAX_IMPORT_BLOB_SIZE)
    assert expected in str(caught.value)


def test_decode_refuses_large_and_trailing_manifests() -> None:
    m, config = cache()
    data, _ = manifest_bytes(m, config, oci_mediatypes=True, image_manifest=False)
    with pytest.raises(FormatError, match="unexpected data"):
        decode_manifest(data + b"{}")
    padded = data[:-1] + b" " * (1 << 20) + b"}"
    with pytest.raises(FormatError, match="manifest is too large"):
        decode_manifest(padded, max_size=MAX_IMPORT_BLOB_SIZE)
    assert decode_manifest(padded).config == config


def test_descriptors_are_validated_and_frozen() -> None:
    d = Descriptor(OCI, dg(1), 0)
    assert d.annotations == {}
    assert d.to_json() == f'{{"mediaType":"{OCI}","digest":"{dg(1)}","size":0}}'
    annotated = Descriptor("", dg(1), 5, {"z": "<", "a": "1"})
    assert annotated.to_json() == (
        f'{{"mediaType":"","digest":"{dg(1)}","size":5,"annotations":{{"a":"1","z":"\\u003c"}}}}'
    )
    source = {"a": "1"}
    copy = Descriptor(OCI, dg(1), 1, source)
    source["a"] = "2"
    assert copy.annotations == {"a": "1"}
    assert hash(copy) == hash(Descriptor(OCI, dg(1), 1, {"a": "1"}))
    with pytest.raises(AttributeError):
        copy.size = 2  # type: ignore[misc]
    with pytest.raises(FormatError, match="size must be a non-negative integer"):
        Descriptor(OCI, dg(1), -1)
    with pytest.raises(FormatError, match="digest must be sha256"):
        Descriptor(OCI, "sha256:abc", 1)
    with pytest.raises(FormatError, match="annotations must map strings to strings"):
        Descriptor(OCI, dg(1), 1, {"a": 1})  # type: ignore[dict-item]
