"""The last step of an export: config blob, manifest blob, then every cache name.

Names are written last, each only after every blob it references was seen in the bucket,
so no name ever points at a missing blob (BuildKit's importer would fail on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

from tasks.backends.s3.ingester import stat
from tasks.cacheformat import Descriptor
from tasks.request import S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def missing_blobs(
    client: S3Client,
    target: S3Spec,
    layers: Sequence[Descriptor],
    head_forbidden: Literal["upload", "fail"] = "upload",
) -> list[str]:
    """Digests of planned layers that are absent or of the wrong size (HEADs in parallel)."""

    def absent(layer: Descriptor) -> bool:
        info = stat(client, target.bucket, target.blob_key(layer.digest), head_forbidden)
        return info is None or info.size != layer.size

    if not layers:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(layers))) as pool:
        flags = list(pool.map(absent, layers))
    return [layer.digest for layer, gone in zip(layers, flags, strict=True) if gone]


def put_blob(client: S3Client, target: S3Spec, descriptor: Descriptor, data: bytes) -> None:
    """Store a small blob (config, manifest) under its digest."""
    client.put_object(
        Bucket=target.bucket,
        Key=target.blob_key(descriptor.digest),
        Body=data,
        ContentType=descriptor.media_type,
    )


def put_names(
    client: S3Client,
    target: S3Spec,
    s3_config: bytes,
    on_name: Callable[[str], None] = lambda name: None,
) -> list[str]:
    """Write the BuildKit S3 form of the config under every name; returns the keys."""
    keys = []
    for name in target.name:
        key = target.manifest_key(name)
        client.put_object(Bucket=target.bucket, Key=key, Body=s3_config)
        on_name(name)
        keys.append(key)
    return keys
