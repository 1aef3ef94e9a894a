"""Cache manifests of the content-store layout: Docker manifest list, OCI index, OCI manifest.

BuildKit's content exporter (``cache/remotecache/export.go``) writes the layer blobs, the
config blob, then one manifest:

- a Docker manifest list (default) or an OCI index (``oci-mediatypes=true``) whose
  ``manifests`` are the layer descriptors, one per config layer entry in config order,
  followed by the config descriptor;
- an OCI image manifest (``image-manifest=true``, needs OCI media types) whose ``config`` is
  the config descriptor and ``layers`` the layer descriptors.

Layer media types are converted to the manifest's flavour (Docker or OCI); the config
descriptor is not. :func:`decode_manifest` reads any of these back as BuildKit's importer
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tasks.cacheformat import gojson
from tasks.cacheformat.descriptor import MEDIA_TYPE_CACHE_CONFIG, Descriptor
from tasks.cacheformat.digests import check_digest, sha256_digest
from tasks.cacheformat.errors import FormatError
from tasks.cacheformat.marshal import Marshalled
from tasks.cacheformat.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    convert_layer,
    layer_media_type,
)

__all__ = [
    "MAX_IMPORT_BLOB_SIZE",
    "ManifestContents",
    "convert_layer",
    "decode_manifest",
    "layer_media_type",
    "manifest_bytes",
]

#: BuildKit's content importer refuses a manifest or config blob larger than this.
MAX_IMPORT_BLOB_SIZE: Final = 1 << 20


def manifest_bytes(
    m: Marshalled, config_desc: Descriptor, *, oci_mediatypes: bool, image_manifest: bool
) -> tuple[bytes, Descriptor]:
    """The manifest blob BuildKit would write for this cache, and its descriptor.

    The descriptor's JSON (:meth:`Descriptor.to_json`) is the exporter's ``cache.manifest``
    value.
    """
    if image_manifest and not oci_mediatypes:
        raise FormatError(
            "invalid configuration for remote cache, OCI mediatypes are required for "
            "image-manifest cache format"
        )
    by_blob = m.descriptors()
    layers = []
    for index, layer in enumerate(m.config.layers):
        descriptor = by_blob.get(layer.blob)
        if descriptor is None:
            raise FormatError(f"missing blob {layer.blob}", f"layers[{index}]")
        layers.append(convert_layer(descriptor, oci=oci_mediatypes).to_go())
    document: dict[str, object]
    if image_manifest:
        media_type = OCI_MANIFEST
        document = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config_desc.to_go(),
            "layers": layers,
        }
    else:
        media_type = OCI_INDEX if oci_mediatypes else DOCKER_MANIFEST_LIST
        document = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [*layers, config_desc.to_go()],
        }
    data = gojson.dumps(document)
    return data, Descriptor(media_type, sha256_digest(data), len(data))


@dataclass
class ManifestContents:
    """What an importer takes from a cache manifest: the config descriptor and the layers."""

    config: Descriptor
    layers: list[Descriptor]


_DETECT_FIELDS: Final = gojson.Fields("mediaType", "config", "manifests", "layers")
_INDEX_FIELDS: Final = gojson.Fields("schemaVersion", "mediaType", "manifests")
_MANIFEST_FIELDS: Final = gojson.Fields("schemaVersion", "mediaType", "config", "layers")
_DESCRIPTOR_FIELDS: Final = gojson.Fields("mediaType", "digest", "size", "annotations")


def decode_manifest(data: bytes, *, max_size: int | None = None) -> ManifestContents:
    """Read a cache manifest list, OCI index or image manifest as BuildKit's importer does.

    The type is inferred as BuildKit infers it (``mediaType``, else the keys present).
    Anything that is not a cache manifest (no cache config descriptor; an image manifest
    whose config is not a cache config) is a FormatError. With ``max_size`` (BuildKit's
    content importer uses :data:`MAX_IMPORT_BLOB_SIZE`), a larger manifest or config is a
    FormatError too; by default there is no limit, since a cache too large for BuildKit's
    content importer is still a valid source for the S3 layout, which has none.
    """
    if max_size is not None and len(data) > max_size:
        raise FormatError(f"manifest is too large ({len(data)} > {max_size} bytes)")
    raw = gojson.loads(data)
    obj = gojson.fold_keys(gojson.expect_object(raw, "manifest"), _DETECT_FIELDS)
    is_manifest = obj.get("config") is not None or obj.get("layers") is not None
    if is_manifest and obj.get("manifests") is not None:
        raise FormatError("invalid ambiguous manifest and manifest list")
    declared = obj.get("mediaType")
    if declared is not None:
        declared = gojson.expect_str(declared, "mediaType")
        if declared in (DOCKER_MANIFEST_LIST, OCI_INDEX) and is_manifest:
            raise FormatError("mediaType in manifest does not match manifest contents")
        if declared in (DOCKER_MANIFEST, OCI_MANIFEST) and not is_manifest:
            raise FormatError("mediaType in manifest does not match manifest contents")

    config: Descriptor | None = None
    config_where = "config"
    layers: list[Descriptor] = []
    if is_manifest:
        fields = gojson.fold_keys(gojson.expect_object(raw, "manifest"), _MANIFEST_FIELDS)
        config = _descriptor(fields.get("config"), "config")
        if config.media_type != MEDIA_TYPE_CACHE_CONFIG:
            raise FormatError(
                f"not a cache manifest: config media type is {config.media_type!r}",
                "config.mediaType",
            )
        for index, item in enumerate(gojson.expect_list(fields.get("layers"), "layers")):
            layers.append(_descriptor(item, f"layers[{index}]"))
    else:
        fields = gojson.fold_keys(gojson.expect_object(raw, "manifest"), _INDEX_FIELDS)
        for index, item in enumerate(gojson.expect_list(fields.get("manifests"), "manifests")):
            descriptor = _descriptor(item, f"manifests[{index}]")
            if descriptor.media_type == MEDIA_TYPE_CACHE_CONFIG:
                config = descriptor  # BuildKit keeps the last one
                config_where = f"manifests[{index}]"
            else:
                layers.append(descriptor)
        if config is None:
            raise FormatError(
                "not a cache manifest: no descriptor of media type " + MEDIA_TYPE_CACHE_CONFIG
            )
    if max_size is not None and config.size > max_size:
        raise FormatError(
            f"cache config is too large ({config.size} > {max_size} bytes)",
            f"{config_where}.size",
        )
    return ManifestContents(config, layers)


def _descriptor(value: object, where: str) -> Descriptor:
    obj = gojson.fold_keys(gojson.expect_object(value, where), _DESCRIPTOR_FIELDS)
    media_type = gojson.expect_str(obj.get("mediaType"), f"{where}.mediaType")
    digest = check_digest(obj.get("digest"), f"{where}.digest")
    size = gojson.expect_int(obj.get("size"), f"{where}.size")
    if size < 0:
        raise FormatError(f"size must not be negative, got {size}", f"{where}.size")
    annotations = gojson.expect_str_map(obj.get("annotations"), f"{where}.annotations")
    return Descriptor(media_type, digest, size, annotations)
