"""Merge on write into a registry tag (``merge=true``), under the fleet-wide lock.

Registries have no conditional writes: a manifest PUT by tag cannot be made to fail when the
tag changed since it was read (no ``If-Match``). So the only guard is the fleet's lease per
(registry, repository, tag), held around read-merge-write; a writer outside the fleet
(BuildKit itself) can still replace the tag between our read and our write, and its cache
is then the one the tag names (docs/registry-target.md).

The merge itself is the S3 one (:mod:`tasks.cacheformat.merge`): the stored cache is read
back (manifest → config, layer descriptors from the manifest), turned into the S3 form the
merge reads, merged with the new export, then written as BuildKit's registry layout again:
the merged config blob, then the manifest by tag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from tasks.backends.registry.client import RegistryClient
from tasks.backends.registry.errors import PermanentRegistryError, RegistryNotFoundError
from tasks.backends.registry.upload import push_bytes
from tasks.backends.source import MAX_METADATA_BYTES
from tasks.backends.target import InvalidStoredConfigError, NameWrite, now_go
from tasks.cacheformat import (
    Descriptor,
    FormatError,
    config_descriptor,
    decode_config,
    decode_manifest,
    encode_config,
    manifest_bytes,
    marshal,
    parse_graph,
    s3_config_bytes,
    sha256_digest,
)
from tasks.cacheformat.merge import (
    DEFAULT_MAX_RECORDS,
    MergeLimits,
    merge_configs,
    read_stored,
    stored_blobs,
)
from tasks.fleet.flight import single_flight
from tasks.plan import ExportPlan
from tasks.request import RegistrySpec


def lock_name(spec: RegistrySpec) -> str:
    ref = spec.reference
    where = f"{ref.endpoint_host}\0{ref.repository}\0{ref.tag}"
    return f"cacheship-name-{hashlib.sha256(where.encode()).hexdigest()[:32]}"


def read_tag(client: RegistryClient, spec: RegistrySpec) -> bytes | None:
    """The cache the tag names, in the S3 form the merge reads; None when there is none.

    FormatError when the tag names something that is not a cache BuildKit could import.
    """
    ref = spec.reference
    try:
        data, _ = client.get_manifest(ref.repository, ref.tag or "latest", MAX_METADATA_BYTES)
    except RegistryNotFoundError:
        return None
    contents = decode_manifest(data)
    try:
        raw = client.read_blob(ref.repository, contents.config.digest, MAX_METADATA_BYTES)
    except (RegistryNotFoundError, PermanentRegistryError) as exc:
        raise FormatError(f"config {contents.config.digest}: {exc}") from None
    if sha256_digest(raw) != contents.config.digest:
        raise FormatError(f"config {contents.config.digest}: content does not match its digest")
    config = decode_config(raw)
    graph = parse_graph(config, {d.digest: d for d in contents.layers})
    return s3_config_bytes(marshal(graph, allow_empty=True))


def merge_into_tag(
    client: RegistryClient,
    redis: Any,
    spec: RegistrySpec,
    plan: ExportPlan,
    *,
    on_wait: Callable[[], None] = lambda: None,
) -> NameWrite:
    """Read what the tag holds, merge the plan into it, push the config then the manifest."""
    from tasks.backends.registry.errors import check_import_limits

    ref = spec.reference
    tag = ref.tag or "latest"
    new = decode_config(plan.s3_config)
    limits = MergeLimits(spec.max_records or DEFAULT_MAX_RECORDS, spec.max_age)
    with single_flight(redis, lock_name(spec), on_wait=on_wait):
        existing, replaced = None, False
        try:
            stored = read_tag(client, spec)
            existing = read_stored(stored) if stored is not None else None
        except FormatError as exc:
            if spec.merge != "replace-invalid":
                raise InvalidStoredConfigError(
                    f"tag {ref} holds no valid cache ({exc}); it was left as it was "
                    "(merge=replace-invalid overwrites it)"
                ) from None
            replaced = True
        gone: set[str] = set()
        if existing is not None:
            for desc in stored_blobs(existing, new):
                if client.blob_size(ref.repository, desc.digest) != desc.size:
                    gone.add(desc.digest)
        merged = merge_configs(existing, new, now=now_go(), limits=limits, missing=gone)
        config = encode_config(merged.marshalled.config)
        config_desc: Descriptor = config_descriptor(config)
        manifest, manifest_desc = manifest_bytes(
            merged.marshalled,
            config_desc,
            oci_mediatypes=spec.oci_mediatypes,
            image_manifest=spec.image_manifest,
        )
        check_import_limits(config_desc, manifest_desc)
        push_bytes(client, ref.repository, config_desc, config)
        client.put_manifest(ref.repository, tag, manifest, manifest_desc.media_type)
    return NameWrite(tag, str(ref), True, merged.counts, False, 1, replaced)
