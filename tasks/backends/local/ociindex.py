"""``index.json`` of an OCI image layout, updated as BuildKit's client updates it.

After a ``--cache-to type=local`` export, BuildKit's client (``client/ociindex``) records the
returned ``cache.manifest`` descriptor: it writes ``oci-layout``, reads ``index.json`` into
Go's ``ocispecs.Index`` (so unknown fields vanish and keys come out in struct order), fills
in ``schemaVersion`` 2 and the OCI index media type when missing, drops every entry holding
the same tag, appends the descriptor annotated with the tag and writes the file back, all
under a ``flock`` of ``index.json.lock`` that it removes afterwards. The bytes written here
are the bytes BuildKit writes; two things differ on purpose:

- the new file is written beside the old one, fsynced and renamed over it, so a reader (or
  a crash) never meets a half-written index, where BuildKit rewrites it in place;
- a writer waits for the lock instead of failing, and checks after locking that the lock
  file is still the one on disk: BuildKit removes it after use, so a writer that waited on a
  removed file would otherwise run beside the next one.

The lock is ``flock(2)``, as BuildKit's (gofrs/flock), so a BuildKit client updating the
same directory is kept out too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from tasks.cacheformat import Descriptor, FormatError, gojson

INDEX_FILE: Final = "index.json"
LAYOUT_FILE: Final = "oci-layout"
LOCK_FILE: Final = INDEX_FILE + ".lock"
#: ``json.Marshal(ocispecs.ImageLayout{Version: "1.0.0"})``.
LAYOUT_BYTES: Final = b'{"imageLayoutVersion":"1.0.0"}'
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
REF_NAME: Final = "org.opencontainers.image.ref.name"
IMAGE_NAME: Final = "io.containerd.image.name"

_INDEX: Final = gojson.Fields(
    "schemaVersion", "mediaType", "artifactType", "manifests", "subject", "annotations"
)
_DESCRIPTOR: Final = gojson.Fields(
    "mediaType", "digest", "size", "urls", "annotations", "data", "platform", "artifactType"
)
_PLATFORM: Final = gojson.Fields("architecture", "os", "os.version", "os.features", "variant")


def _strings(value: object, where: str) -> list[str]:
    return [gojson.expect_str(item, where) for item in gojson.expect_list(value, where)]


def _platform(value: object, where: str) -> dict[str, object]:
    obj = gojson.fold_keys(gojson.expect_object(value, where), _PLATFORM)
    out: dict[str, object] = {
        "architecture": gojson.expect_str(obj.get("architecture"), f"{where}.architecture"),
        "os": gojson.expect_str(obj.get("os"), f"{where}.os"),
    }
    if version := gojson.expect_str(obj.get("os.version"), f"{where}.os.version"):
        out["os.version"] = version
    if features := _strings(obj.get("os.features"), f"{where}.os.features"):
        out["os.features"] = features
    if variant := gojson.expect_str(obj.get("variant"), f"{where}.variant"):
        out["variant"] = variant
    return out


def _descriptor(value: object, where: str) -> dict[str, object]:
    """One ``ocispecs.Descriptor`` as Go decodes and re-encodes it."""
    obj = gojson.fold_keys(gojson.expect_object(value, where), _DESCRIPTOR)
    out: dict[str, object] = {
        "mediaType": gojson.expect_str(obj.get("mediaType"), f"{where}.mediaType"),
        "digest": gojson.expect_str(obj.get("digest"), f"{where}.digest"),
        "size": gojson.expect_int(obj.get("size"), f"{where}.size"),
    }
    if urls := _strings(obj.get("urls"), f"{where}.urls"):
        out["urls"] = urls
    if annotations := gojson.expect_str_map(obj.get("annotations"), f"{where}.annotations"):
        out["annotations"] = gojson.sorted_map(annotations)
    data = gojson.expect_str(obj.get("data"), f"{where}.data")
    if data:
        try:
            raw = base64.b64decode(data.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            raise FormatError("not base64", f"{where}.data") from None
        if raw:
            out["data"] = base64.b64encode(raw).decode("ascii")
    if obj.get("platform") is not None:
        out["platform"] = _platform(obj["platform"], f"{where}.platform")
    if artifact := gojson.expect_str(obj.get("artifactType"), f"{where}.artifactType"):
        out["artifactType"] = artifact
    return out


def read_index(data: bytes) -> dict[str, object]:
    """``index.json`` as Go's ``ocispecs.Index`` holds it, defaults filled in; empty is new."""
    obj: dict[str, object] = {}
    if data:  # Go reads an empty file as a new index, anything else must parse
        obj = gojson.fold_keys(gojson.expect_object(gojson.loads(data), ""), _INDEX)
    index: dict[str, object] = {
        "schemaVersion": gojson.expect_int(obj.get("schemaVersion"), "schemaVersion") or 2,
        "mediaType": gojson.expect_str(obj.get("mediaType"), "mediaType") or OCI_INDEX,
    }
    if artifact := gojson.expect_str(obj.get("artifactType"), "artifactType"):
        index["artifactType"] = artifact
    index["manifests"] = [
        _descriptor(item, f"manifests[{i}]")
        for i, item in enumerate(gojson.expect_list(obj.get("manifests"), "manifests"))
    ]
    if obj.get("subject") is not None:
        index["subject"] = _descriptor(obj["subject"], "subject")
    if annotations := gojson.expect_str_map(obj.get("annotations"), "annotations"):
        index["annotations"] = gojson.sorted_map(annotations)
    return index


def insert_tagged(index: dict[str, object], desc: Descriptor, tag: str) -> dict[str, object]:
    """BuildKit's ``insertDesc`` for a tag: entries with this tag go, the new one is last.

    An entry named by image (``io.containerd.image.name``) is an image, not this tag: kept.
    """
    entry = desc.to_go()
    annotations = dict(desc.annotations)
    annotations[REF_NAME] = tag
    entry["annotations"] = gojson.sorted_map(annotations)
    kept = []
    for item in index["manifests"]:  # type: ignore[attr-defined]
        marks = item.get("annotations") or {}
        if marks.get(REF_NAME, "") != tag or marks.get(IMAGE_NAME, ""):
            kept.append(item)
    return {**index, "manifests": [*kept, entry]}


def encode_index(index: dict[str, object]) -> bytes:
    """Go's ``json.Marshal`` of the index (key order is the dicts' order, built above)."""
    return gojson.dumps(index)


@contextlib.contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """Hold ``index.json.lock`` (flock); the file is removed when released, as BuildKit does."""
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (
            held.st_dev,
            held.st_ino,
        ):
            break
        os.close(fd)  # the file we waited on was removed by the previous holder: again
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """A rename is durable only once its directory is synced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(directory: Path, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write, fsync, rename over ``name``: readers see the old file or the new one."""
    tmp = directory / f"{name}.tmp-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.rename(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def put_tagged(directory: Path, desc: Descriptor, tag: str) -> bytes:
    """Record ``desc`` under ``tag`` in ``directory/index.json``; returns the bytes written.

    An unreadable ``index.json`` is an error (FormatError naming the place), and then
    nothing is changed: BuildKit refuses it too.
    """
    with index_lock(directory):
        # Temporary files of a writer that died while holding the lock: only holders write.
        for name in (INDEX_FILE, LAYOUT_FILE):
            for stale in directory.glob(f"{name}.tmp-*"):
                stale.unlink(missing_ok=True)
        try:
            old = (directory / INDEX_FILE).read_bytes()
        except FileNotFoundError:
            old = b""
        try:
            index = read_index(old)
        except FormatError as exc:
            raise FormatError(f"{INDEX_FILE}: {exc}") from None
        data = encode_index(insert_tagged(index, desc, tag))
        layout = directory / LAYOUT_FILE
        try:
            same_layout = layout.read_bytes() == LAYOUT_BYTES
        except FileNotFoundError:
            same_layout = False
        if not same_layout:
            write_atomic(directory, LAYOUT_FILE, LAYOUT_BYTES)
        write_atomic(directory, INDEX_FILE, data)
    return data
