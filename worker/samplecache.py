"""A realistic BuildKit local cache, written the way ``--export-cache type=local`` writes it.

Used by ``cacheship demo`` and the tests: real gzip'd tar layers with correct diffIDs, a
chain of build steps (records linked input to output), and BuildKit's OCI layout
(``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) with an OCI index holding the layers
and the cache config.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.cacheformat import (
    Descriptor,
    config_descriptor,
    decode_config,
    descriptors_from_annotations,
    encode_config,
    manifest_bytes,
    marshal,
    parse_graph,
)

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class SampleCache:
    """Where the cache was written and what it holds."""

    path: Path
    layers: list[Descriptor]
    manifest: Descriptor
    config: Descriptor


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(size: int, seed: int, compresslevel: int = 1) -> tuple[bytes, str]:
    """A gzip'd tar holding one file of ``size`` pseudo-random bytes; returns (blob, diffID)."""
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"layer-{seed}/data.bin")
        info.size = size
        info.mtime = 1_700_000_000
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    blob = gzip.compress(tar_bytes, compresslevel=compresslevel, mtime=0)
    return blob, _sha(tar_bytes)


def _write_blob(directory: Path, data: bytes) -> str:
    digest = _sha(data)
    path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def write_sample_cache(
    directory: Path,
    layer_sizes: list[int],
    *,
    seed: int = 1,
    tag: str = "latest",
    image_manifest: bool = False,
) -> SampleCache:
    """A build of ``len(layer_sizes)`` steps: step i adds layer i on top of step i-1.

    Besides the chain, a second branch (a cache mount-style record reusing the first layer)
    and a ``random:`` record make the graph look like BuildKit's, not like a list.
    """
    directory.mkdir(parents=True, exist_ok=True)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    layers_json: list[dict[str, object]] = []
    records: list[dict[str, object]] = [
        {"digest": _sha(f"base-image-{seed}".encode())},
    ]
    for i, size in enumerate(layer_sizes):
        blob, diff_id = make_layer(size, seed * 1000 + i)
        digest = _write_blob(directory, blob)
        created = (base + timedelta(minutes=i, microseconds=123457)).strftime(
            "%Y-%m-%dT%H:%M:%S.%f"
        ) + "001Z"
        layers_json.append(
            {
                "blob": digest,
                "parent": i - 1,
                "annotations": {
                    "mediaType": LAYER_GZIP,
                    "diffID": diff_id,
                    "size": len(blob),
                    "createdAt": created,
                },
            }
        )
        records.append(
            {
                "digest": _sha(f"step-{seed}-{i}".encode()),
                "inputs": [[{"selector": "", "link": len(records) - 1}]],
                "layers": [{"layer": i, "createdAt": created}],
            }
        )
    if layer_sizes:
        records.append(
            {
                "digest": _sha(f"copy-src-{seed}".encode()),
                "inputs": [[{"selector": "/src", "link": 1}]],
                "layers": [{"layer": 0, "createdAt": layers_json[0]["annotations"]["createdAt"]}],  # type: ignore[index]
            }
        )
    records.append({"digest": "random:" + os.urandom(8).hex(), "inputs": [[{"link": 0}]]})
    layers, manifest, config = write_layout(
        directory,
        {"layers": layers_json, "records": records},
        tag=tag,
        image_manifest=image_manifest,
    )
    return SampleCache(directory, layers, manifest, config)


def write_layout(
    directory: Path,
    config_json: dict[str, object],
    *,
    tag: str = "latest",
    image_manifest: bool = False,
) -> tuple[list[Descriptor], Descriptor, Descriptor]:
    """Normalise a config as BuildKit does and lay it out as ``type=local`` writes it.

    The layer blobs must already be in ``blobs/sha256``; this writes the config blob, the
    manifest blob (an OCI index, or an image manifest), ``index.json`` and ``oci-layout``.
    Returns the layer descriptors, the manifest's and the config's.
    """
    config = decode_config(json.dumps(config_json))
    marshalled = marshal(parse_graph(config, descriptors_from_annotations(config)))
    config_bytes = encode_config(marshalled.config)
    config_desc = config_descriptor(config_bytes)
    _write_blob(directory, config_bytes)
    manifest, manifest_desc = manifest_bytes(
        marshalled, config_desc, oci_mediatypes=True, image_manifest=image_manifest
    )
    _write_blob(directory, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest_desc.media_type,
                "digest": manifest_desc.digest,
                "size": manifest_desc.size,
                "annotations": {REF_NAME: tag},
            }
        ],
    }
    # BuildKit's client writes it with Go's json.Marshal: no spaces, no newline.
    (directory / "index.json").write_text(json.dumps(index, separators=(",", ":")))
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return list(marshalled.layers), manifest_desc, config_desc
