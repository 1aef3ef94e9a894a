"""A cache directory as ``--export-cache type=local,dest=DIR`` writes it (OCI image layout).

Workers only read under the configured source roots. Every file is opened first and then
checked (where the opened file really is, that it is still that path, one link only), so
no symlink swapped in after a check and no hard link can make a worker read elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tasks.backends.local.dirs import inside as _inside
from tasks.backends.local.dirs import resolve_source_dir
from tasks.backends.source import (
    MAX_METADATA_BYTES,
    LoadedCache,
    MissingBlobError,
    SourceError,
    check_layer_count,
)
from tasks.cacheformat import (
    Descriptor,
    FormatError,
    check_digest,
    decode_config,
    decode_manifest,
    sha256_digest,
)
from tasks.request import LocalSpec

REF_NAME = "org.opencontainers.image.ref.name"


def blob_name(digest: str) -> str:
    """``blobs/sha256/<hex>``, relative to the cache directory."""
    algorithm, _, hexpart = check_digest(digest, "digest").partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def blob_path(directory: Path, digest: str) -> Path:
    """Where a blob's file is (for messages and tests; reads go through ``open_in``)."""
    return directory / blob_name(digest)


def opened_path(fd: int) -> Path:
    """Where an open file really is, as the kernel tracks it (not a new path resolution).

    On Linux ``/proc/self/fd/N`` names it; elsewhere ``F_GETPATH``. A file unlinked since
    it was opened reads ``... (deleted)``, which lies inside no root.
    """
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
    getpath = getattr(fcntl, "F_GETPATH", None)
    if getpath is None:
        raise SourceError("cannot tell where an opened file is (no /proc on this host)")
    raw = fcntl.fcntl(fd, getpath, b"\0" * 1024)
    return Path(os.fsdecode(raw.rstrip(b"\0")))


def check_opened(fd: int, inside: Sequence[Path], what: str, *, directory: bool) -> Path:
    """What ``fd`` opened lies inside one of ``inside``, is the kind expected, and is its
    path now (same device and inode): returns that real path.

    Checking the opened file, not the path before opening it, leaves no window in which a
    symlink swapped into the path can redirect the read. A regular file must have one
    link: a hard link has no "outside" to resolve, so one made to a file elsewhere on the
    filesystem would pass any path check.
    """
    info = os.fstat(fd)
    real = opened_path(fd)
    if not any(_inside(real, root) for root in inside):
        raise SourceError(f"{what}: leads out of the allowed directories (to {real})")
    try:
        now = os.stat(real)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
        raise SourceError(f"{what}: was moved or replaced while it was being opened")
    if directory:
        if not stat.S_ISDIR(info.st_mode):
            raise SourceError(f"{what}: is not a directory")
    elif not stat.S_ISREG(info.st_mode):
        raise SourceError(f"{what}: is not a regular file")
    elif info.st_nlink != 1:
        raise SourceError(
            f"{what}: has {info.st_nlink} hard links; a cache file must be a file of its own "
            "(copy the cache instead of linking it)"
        )
    return real


def _open_fd(name: str | Path, what: str, flags: int, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise MissingBlobError(f"{what}: missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SourceError(f"{what}: is a symbolic link, which is not followed") from None
        if exc.errno == errno.ENOTDIR:
            raise SourceError(f"{what}: is not a directory") from None
        raise SourceError(f"{what}: cannot be read ({exc.strerror})") from None


@contextlib.contextmanager
def open_source_dir(src: str, roots: Sequence[Path]) -> Iterator[tuple[int, Path]]:
    """The cache directory opened (fd, real path), checked after opening to lie in a root."""
    directory = resolve_source_dir(src, roots)
    fd = _open_fd(directory, "source.src", os.O_DIRECTORY)
    try:
        real_roots = [Path(os.path.realpath(root)) for root in roots]
        real = check_opened(fd, real_roots, "source.src", directory=True)
        yield fd, real
    finally:
        os.close(fd)


def open_in(dir_fd: int, directory: Path, name: str, what: str) -> BinaryIO:
    """A file of the cache directory, opened without following a final symlink and then
    checked to be a single-link regular file inside the directory."""
    fd = _open_fd(name, what, os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        check_opened(fd, [directory], what, directory=False)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _read_small(dir_fd: int, directory: Path, name: str, what: str) -> bytes:
    with open_in(dir_fd, directory, name, what) as handle:
        try:
            data = handle.read(MAX_METADATA_BYTES + 1)
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


def load(spec: LocalSpec, roots: Sequence[Path], max_layers: int | None = None) -> LoadedCache:
    """Read index.json → manifest → cache config, with every layer descriptor.

    A cache with more than ``max_layers`` layers is refused once its manifest is read,
    before its config is parsed or anything is planned.
    """
    with open_source_dir(spec.src, roots) as (dir_fd, directory):
        return _load(spec, dir_fd, directory, max_layers)


def _load(spec: LocalSpec, dir_fd: int, directory: Path, max_layers: int | None) -> LoadedCache:
    try:
        index = json.loads(_read_small(dir_fd, directory, "index.json", "index.json"))
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
    data = _read_verified(dir_fd, directory, digest, size if type(size) is int else None, what)
    try:
        manifest = decode_manifest(data)
    except FormatError as exc:
        raise SourceError(f"manifest {digest}: {exc}") from None
    check_layer_count(len(manifest.layers), max_layers)
    config_desc = manifest.config
    what = f"config {config_desc.digest}"
    config_bytes = _read_verified(dir_fd, directory, config_desc.digest, config_desc.size, what)
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


def _read_verified(
    dir_fd: int, directory: Path, digest: str, size: int | None, what: str
) -> bytes:
    """A small blob, refused unless it has the size and the digest its descriptor gives."""
    data = _read_small(dir_fd, directory, blob_name(digest), what)
    if size is not None and len(data) != size:
        raise SourceError(f"{what}: has {len(data)} bytes, its descriptor says {size}")
    if sha256_digest(data) != digest:
        raise SourceError(f"{what}: content does not match its digest")
    return data


def check_blobs(spec: LocalSpec, roots: Sequence[Path], layers: Sequence[Descriptor]) -> None:
    """Every layer file is there with its descriptor's size: refused before anything is copied.

    (The bytes themselves are verified while they are copied.)
    """
    with open_source_dir(spec.src, roots) as (dir_fd, directory):
        for layer in layers:
            what = f"layer {layer.digest}"
            try:
                with open_in(dir_fd, directory, blob_name(layer.digest), what) as handle:
                    size = os.fstat(handle.fileno()).st_size
            except MissingBlobError:
                raise MissingBlobError(f"{what}: missing from the source") from None
            if size != layer.size:
                raise SourceError(
                    f"{what}: the source has {size} bytes, its descriptor says {layer.size}"
                )


def open_blob(spec: LocalSpec, roots: Sequence[Path], digest: str) -> BinaryIO:
    """A binary stream of one layer blob (checked after opening, like every read here)."""
    with open_source_dir(spec.src, roots) as (dir_fd, directory):
        try:
            return open_in(dir_fd, directory, blob_name(digest), f"blob {digest}")
        except MissingBlobError:
            raise MissingBlobError("blob missing from the source directory") from None
