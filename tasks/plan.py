"""From a loaded cache to everything an export will write, decided before anything is written.

Parsing, normalising and encoding happen here, once, so that a bad cache is refused before
the first byte reaches the bucket, and every later step only copies bytes decided now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tasks.backends.source import LoadedCache
from tasks.cacheformat import (
    MAX_IMPORT_BLOB_SIZE,
    Descriptor,
    config_descriptor,
    encode_config,
    manifest_bytes,
    marshal,
    parse_graph,
    s3_config_bytes,
)
from tasks.request import LocalTargetSpec, RegistrySpec, S3Spec


@dataclass(frozen=True)
class ExportPlan:
    """The blobs to copy and the small documents to write after them."""

    layers: list[Descriptor]
    config: bytes
    config_desc: Descriptor
    manifest: bytes
    manifest_desc: Descriptor
    s3_config: bytes

    @property
    def bytes_total(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def warnings(self) -> list[str]:
        """What BuildKit would refuse when reading this cache back; the export still happens.

        BuildKit's local and registry importers read at most 1 MiB of a cache manifest or
        config: the content layout (``cache.manifest``) of a larger cache cannot be
        imported that way. The S3 layout has no such limit.
        """
        found = []
        for what, desc in (("config", self.config_desc), ("manifest", self.manifest_desc)):
            if desc.size > MAX_IMPORT_BLOB_SIZE:
                found.append(
                    f"cache {what} {desc.digest} is {desc.size} bytes, over the "
                    f"{MAX_IMPORT_BLOB_SIZE} bytes BuildKit's local and registry importers "
                    "read: they cannot import this cache.manifest; type=s3 imports are fine"
                )
        return found

    def to_json(self) -> dict[str, Any]:
        """JSON-only, as every message and result is."""
        return {
            "layers": [_desc_to_json(d) for d in self.layers],
            "config": self.config.decode(),
            "config_desc": _desc_to_json(self.config_desc),
            "manifest": self.manifest.decode(),
            "manifest_desc": _desc_to_json(self.manifest_desc),
            "s3_config": self.s3_config.decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportPlan:
        return cls(
            layers=[desc_from_json(d) for d in data["layers"]],
            config=data["config"].encode(),
            config_desc=desc_from_json(data["config_desc"]),
            manifest=data["manifest"].encode(),
            manifest_desc=desc_from_json(data["manifest_desc"]),
            s3_config=data["s3_config"].encode(),
        )


def _desc_to_json(desc: Descriptor) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(desc.to_json())
    return result


def desc_from_json(data: dict[str, Any]) -> Descriptor:
    """The inverse of ``Descriptor.to_json`` for messages (trusted: written by us)."""
    return Descriptor(
        media_type=data["mediaType"],
        digest=data["digest"],
        size=int(data["size"]),
        annotations=dict(data.get("annotations") or {}),
    )


def plan_export(
    cache: LoadedCache, target: S3Spec | LocalTargetSpec | RegistrySpec
) -> ExportPlan:
    """Parse → graph → normalised config → manifest; raises FormatError / EmptyCacheError.

    Every target writes the same config and manifest blobs (local and registry targets with
    their own defaults: an OCI image manifest); ``s3_config`` is used by S3 targets (and
    merges) only.
    """
    graph = parse_graph(cache.config, cache.descriptors)
    marshalled = marshal(graph)
    config = encode_config(marshalled.config)
    config_desc = config_descriptor(config)
    manifest, manifest_desc = manifest_bytes(
        marshalled,
        config_desc,
        oci_mediatypes=target.oci_mediatypes,
        image_manifest=target.image_manifest,
    )
    return ExportPlan(
        layers=list(marshalled.layers),
        config=config,
        config_desc=config_desc,
        manifest=manifest,
        manifest_desc=manifest_desc,
        s3_config=s3_config_bytes(marshalled),
    )
