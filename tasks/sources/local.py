"""A cache directory as ``--export-cache type=local,dest=DIR`` writes it (OCI image layout).

Workers only read under the configured source roots: the directory and every blob path are
resolved (symlinks followed) and must stay inside one of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tasks.cacheformat import (
    Descriptor,
    FormatError,
    check_digest,
    decode_config,
    decode_manifest,
    sha256_digest,
)
from tasks.request import LocalSpec
from tasks.sources.common import MAX_METADATA_BYTES, LoadedCache, MissingBlobError, SourceError
from tasks.sources.localdir import inside as _inside
from tasks.sources.localdir import resolve_source_dir

REF_NAME = "org.opencontainers.image.ref.name"


def blob_path(directory: Path, digest: str) -> Path:
    """``blobs/sha256/<hex>``, refused if a symlink leads out of the cache directory."""
    algorithm, _, hexpart = check_digest(digest, "digest").partition(":")
    path = directory / "blobs" / algorithm / hexpart
    real = Path(os.path.realpath(path))
    if not _inside(real, directory):
        raise SourceError(f"blob {digest}: its path leaves the cache directory")
    return real


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        raise MissingBlobError(f"{what}: missing") from None
    except OSError as exc:
        raise SourceError(f"{what}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_METADATA_BYTES:
        raise SourceError(f"{what}: larger than {MAX_METADATA_BYTES} bytes")
    return data


def _pick_manifest(index: dict[str, Any], spec: LocalSpec) -> dict[str, Any]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise SourceError("index.json: has no manifests")
    for entry in manifests:
        if not isinstance(entry, dict):
            raise SourceError("index.json: manifests must be objects")
        if spec.digest is not None:
            if entry.get("digest") == spec.digest:
                return entry
            continue
        annotations = entry.get("annotations") or {}
        if annotations.get(REF_NAME) == (spec.tag or "latest"):
            return entry
    wanted = f"digest {spec.digest}" if spec.digest else f"tag {spec.tag or 'latest'!r}"
    raise SourceError(f"index.json: no manifest with {wanted}")


def load(spec: LocalSpec, roots: Sequence[Path]) -> LoadedCache:
    """Read index.json → manifest → cache config, with every layer descriptor."""
    directory = resolve_source_dir(spec.src, roots)
    try:
        index = json.loads(_read_small(directory / "index.json", "index.json"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"index.json: not JSON ({exc.msg})") from None
    if not isinstance(index, dict):
        raise SourceError("index.json: not a JSON object")
    entry = _pick_manifest(index, spec)
    try:
        digest = check_digest(entry.get("digest"), "index.json manifest digest")
    except FormatError as exc:
        raise SourceError(str(exc)) from None
    size = entry.get("size")
    what = f"index.json manifest {digest}"
    data = _read_verified(directory, digest, size if type(size) is int else None, what)
    try:
        manifest = decode_manifest(data)
    except FormatError as exc:
        raise SourceError(f"manifest {digest}: {exc}") from None
    config_desc = manifest.config
    what = f"config {config_desc.digest}"
    config_bytes = _read_verified(directory, config_desc.digest, config_desc.size, what)
    try:
        config = decode_config(config_bytes)
    except FormatError as exc:
        raise SourceError(f"{what}: {exc}") from None
    media_type = entry.get("mediaType")
    return LoadedCache(
        config=config,
        descriptors={d.digest: d for d in manifest.layers},
        manifest=Descriptor(
            media_type if isinstance(media_type, str) else "", digest, len(data)
        ),
        config_desc=config_desc,
    )


def _read_verified(directory: Path, digest: str, size: int | None, what: str) -> bytes:
    """A small blob, refused unless it has the size and the digest its descriptor gives."""
    data = _read_small(blob_path(directory, digest), what)
    if size is not None and len(data) != size:
        raise SourceError(f"{what}: has {len(data)} bytes, its descriptor says {size}")
    if sha256_digest(data) != digest:
        raise SourceError(f"{what}: content does not match its digest")
    return data


def check_blobs(spec: LocalSpec, roots: Sequence[Path], layers: Sequence[Descriptor]) -> None:
    """Every layer file is there with its descriptor's size: refused before anything is copied.

    (The bytes themselves are verified while they are copied.)
    """
    directory = resolve_source_dir(spec.src, roots)
    for layer in layers:
        path = blob_path(directory, layer.digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MissingBlobError(f"layer {layer.digest}: missing from the source") from None
        if size != layer.size:
            raise SourceError(
                f"layer {layer.digest}: the source has {size} bytes, its descriptor says "
                f"{layer.size}"
            )


def open_blob(spec: LocalSpec, roots: Sequence[Path], digest: str) -> BinaryIO:
    """A binary stream of one layer blob."""
    directory = resolve_source_dir(spec.src, roots)
    try:
        return blob_path(directory, digest).open("rb")
    except FileNotFoundError:
        raise MissingBlobError("blob missing from the source directory") from None
