"""Copy one layer blob into the target: skip it, touch it, or stream it through the ingester.

This is BuildKit's per-layer step of the S3 exporter (exists? touch when stale : upload),
written as one plain function so a task only has to call it and report progress.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO, Literal

from tasks.backends.s3.ingester import BlobInfo, BlobWriter, stat, touch
from tasks.backends.target import CopyOutcome, DigestMismatchError
from tasks.cacheformat import Descriptor
from tasks.request import S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK = 1024 * 1024


def _read(stream: BinaryIO, size: int) -> bytes | bytearray:
    """Up to ``size`` bytes; straight into a new bytearray when the stream can."""
    readinto = getattr(stream, "readinto", None)
    if readinto is None:
        return stream.read(size)
    buffer = bytearray(size)
    got = 0
    with memoryview(buffer) as view:
        while got < size and (n := readinto(view[got:])):
            got += n
    del buffer[got:]
    return buffer


def fresh(info: BlobInfo, touch_refresh: float) -> bool:
    """A stored blob young enough to be skipped; older ones are touched (lifecycle rules)."""
    return (datetime.now(UTC) - info.last_modified).total_seconds() < touch_refresh


def copy_blob(
    open_source: Callable[[], AbstractContextManager[BinaryIO]],
    client: S3Client,
    target: S3Spec,
    layer: Descriptor,
    *,
    head_forbidden: Literal["upload", "fail"] = "upload",
    min_part_size: int = 8 * CHUNK,
    progress: Callable[[int], None] = lambda done: None,
    head: bool = True,
    info: BlobInfo | None = None,
) -> CopyOutcome:
    """Make ``target`` hold ``layer`` byte for byte; safe to run any number of times.

    ``head=False``: the caller has just HEADed the key and passes what it found as ``info``
    (a HEAD per layer is most of the work of a warm export: never send two).
    """
    key = target.blob_key(layer.digest)
    if head:
        info = stat(client, target.bucket, key, head_forbidden)
    if info is not None and info.size == layer.size:
        if not fresh(info, target.touch_refresh):
            touch(client, target.bucket, key, info.size)
            return CopyOutcome(layer.digest, layer.size, "touched")
        return CopyOutcome(layer.digest, layer.size, "skipped")

    writer = BlobWriter(
        client,
        target.bucket,
        key,
        layer.digest,
        layer.size,
        min_part_size=min_part_size,
        parallelism=target.upload_parallelism,
        on_progress=progress,
    )
    # Whole parts per read, into bytearrays: the writer then sends each one without a copy.
    read_size = CHUNK if writer.single else writer.part_size
    try:
        with open_source() as stream:
            while chunk := _read(stream, read_size):
                writer.write(chunk)
                # What the store holds: reading runs ahead by the parts in flight.
                progress(writer.stored if not writer.single else writer.offset)
        writer.commit(layer.size, layer.digest)
    except DigestMismatchError:
        raise
    except BaseException:
        writer.close()
        raise
    return CopyOutcome(
        layer.digest, layer.size, "uploaded", writer.bytes_sent, writer.bytes_resumed
    )
