"""``cacheship verify --cache type=registry,ref=...``: would BuildKit import this cache?

Read as BuildKit's registry importer reads it: the manifest under the tag (or the pinned
digest) with the manifest ``Accept``, refused above 1 MiB; the config blob, refused above
1 MiB, checked against its descriptor; the records parsed with the manifest's layer
descriptors; then every layer blob HEADed for its size (``--deep``: read back and hashed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tasks.backends.registry.client import RegistryClient
from tasks.backends.registry.errors import RegistryError
from tasks.backends.registry.source import BlobStream
from tasks.backends.source import MAX_METADATA_BYTES
from tasks.cacheformat import (
    MAX_IMPORT_BLOB_SIZE,
    FormatError,
    decode_config,
    decode_manifest,
    parse_graph,
    sha256_digest,
)
from tasks.request import RegistrySpec
from tasks.verify import BlobCheck, NameReport, Problem, VerifyReport

CHUNK = 1024 * 1024


def _over(size: int) -> str:
    return (
        f"{size} bytes, over the {MAX_IMPORT_BLOB_SIZE} bytes (1 MiB) BuildKit's registry "
        f"importer reads: it refuses this cache (remedies: mode=min, or merge=true with "
        f"max_records)"
    )


def _check_blob(
    client: RegistryClient, repository: str, blob: BlobCheck, deep: bool
) -> Problem | None:
    where = f"layer {blob.digest}"
    try:
        size = client.blob_size(repository, blob.digest)
    except RegistryError as exc:
        return Problem(where, f"blob cannot be read: {exc}")
    if size is None:
        return Problem(where, f"blob missing (nothing at {blob.key})")
    blob.found, blob.stored_size = True, size
    if size != blob.size:
        return Problem(where, f"blob is {size} bytes, the manifest says {blob.size}")
    if not deep:
        return None
    hasher = hashlib.sha256()
    try:
        stream = BlobStream(client, repository, blob.digest)
        try:
            while chunk := stream.read(CHUNK):
                hasher.update(chunk)
        finally:
            stream.close()
    except Exception as exc:
        return Problem(where, f"blob cannot be read: {exc}")
    blob.hashed = True
    actual = "sha256:" + hasher.hexdigest()
    if actual != blob.digest:
        return Problem(where, f"blob holds other bytes: their sha256 is {actual}")
    return None


def verify_registry_cache(
    client: RegistryClient,
    spec: RegistrySpec,
    *,
    deep: bool = False,
    parallelism: int = 8,
    on_blob: Callable[[BlobCheck], None] | None = None,
) -> VerifyReport:
    ref = spec.reference
    report = VerifyReport(bucket="", deep=deep, ref=str(ref))
    named = NameReport(name=ref.reference, key=str(ref))
    report.names.append(named)
    try:
        data, _ = client.get_manifest(ref.repository, ref.reference, MAX_METADATA_BYTES)
    except RegistryError as exc:
        report.problems.append(Problem(str(ref), f"manifest cannot be read: {exc}"))
        return report
    digest = sha256_digest(data)
    where = f"manifest {digest}"
    if ref.digest is not None and digest != ref.digest:
        report.problems.append(Problem(where, f"the registry sent other bytes than {ref.digest}"))
        return report
    if len(data) > MAX_IMPORT_BLOB_SIZE:
        report.problems.append(Problem(where, _over(len(data))))
    try:
        manifest = decode_manifest(data)
    except FormatError as exc:
        report.problems.append(Problem(where, f"not a BuildKit cache manifest: {exc}"))
        return report
    config_desc = manifest.config
    where = f"config {config_desc.digest}"
    if config_desc.size > MAX_IMPORT_BLOB_SIZE:
        report.problems.append(Problem(where, _over(config_desc.size)))
    try:
        raw = client.read_blob(ref.repository, config_desc.digest, MAX_METADATA_BYTES)
    except RegistryError as exc:
        report.problems.append(Problem(where, f"cannot be read: {exc}"))
        return report
    named.found, named.config_size = True, len(raw)
    if len(raw) != config_desc.size or sha256_digest(raw) != config_desc.digest:
        report.problems.append(Problem(where, "content does not match its descriptor"))
        return report
    try:
        config = decode_config(raw)
        descriptors = {d.digest: d for d in manifest.layers}
        parse_graph(config, descriptors)
    except FormatError as exc:
        report.problems.append(Problem(where, f"the records do not parse: {exc}"))
        return report
    named.layers, named.records = len(config.layers), len(config.records)
    if not config.layers:
        report.problems.append(Problem(where, "the cache holds no layers: nothing is imported"))
    seen: dict[str, BlobCheck] = {}
    for layer in config.layers:
        desc = descriptors.get(layer.blob)
        if desc is None:
            report.problems.append(
                Problem(
                    f"layer {layer.blob}",
                    "in the config but not in the manifest: BuildKit drops the results using it",
                )
            )
            continue
        if desc.digest not in seen:
            seen[desc.digest] = BlobCheck(
                desc.digest, desc.size, f"{ref.name}@{desc.digest}"
            )
    report.blobs = list(seen.values())
    if report.blobs:
        workers = max(1, min(parallelism, len(report.blobs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checks = pool.map(
                lambda b: (b, _check_blob(client, ref.repository, b, deep)), report.blobs
            )
            for blob, problem in checks:
                if problem is not None:
                    report.problems.append(problem)
                if on_blob is not None:
                    on_blob(blob)
    return report
