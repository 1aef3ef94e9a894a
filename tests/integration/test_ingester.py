"""The S3 ingester against a real S3-protocol server: commit only on a verified match."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from tasks.backends.s3.ingester import BlobWriter, open_uploads, stat
from tasks.backends.target import DigestMismatchError

MiB = 1024 * 1024


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _feed(writer: BlobWriter, data: bytes, chunk: int = MiB) -> None:
    for start in range(0, len(data), chunk):
        writer.write(data[start : start + chunk])


@pytest.mark.parametrize("size", [0, 1000, 5 * MiB, 17 * MiB + 3])
def test_verified_blob_is_stored_exactly(s3: Any, bucket: str, size: int) -> None:
    data = os.urandom(size)
    key = f"blobs/{_digest(data)}"
    writer = BlobWriter(s3, bucket, key, _digest(data), size, min_part_size=5 * MiB)
    _feed(writer, data)
    writer.commit(size, _digest(data))
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert writer.bytes_sent == size
    assert open_uploads(s3, bucket, key) == []


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_mismatch_leaves_nothing(s3: Any, bucket: str, size: int) -> None:
    data = os.urandom(size)
    claimed = _digest(b"other bytes")
    key = f"blobs/{claimed}"
    writer = BlobWriter(s3, bucket, key, claimed, size, min_part_size=5 * MiB)
    _feed(writer, data)
    with pytest.raises(DigestMismatchError, match="does not match"):
        writer.commit(size, claimed)
    assert stat(s3, bucket, key) is None
    assert open_uploads(s3, bucket, key) == []


def test_longer_source_than_descriptor_is_refused_while_streaming(s3: Any, bucket: str) -> None:
    data = os.urandom(11 * MiB)
    key = "blobs/sha256:" + "0" * 64
    writer = BlobWriter(s3, bucket, key, "sha256:" + "0" * 64, 6 * MiB, min_part_size=5 * MiB)
    with pytest.raises(DigestMismatchError, match="more than"):
        _feed(writer, data)
    assert open_uploads(s3, bucket, key) == []


def test_unfinished_upload_resumes_without_resending_stored_parts(s3: Any, bucket: str) -> None:
    data = os.urandom(23 * MiB)
    digest = _digest(data)
    key = f"blobs/{digest}"
    first = BlobWriter(s3, bucket, key, digest, len(data), min_part_size=5 * MiB, parallelism=2)
    _feed(first, data[: 16 * MiB])
    first.close()  # the worker died: the upload stays open with three parts
    stored = first.bytes_sent
    assert stored >= 10 * MiB

    second = BlobWriter(s3, bucket, key, digest, len(data), min_part_size=5 * MiB)
    _feed(second, data)
    second.commit(len(data), digest)
    assert second.bytes_resumed == stored
    assert second.bytes_sent == len(data) - stored
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert open_uploads(s3, bucket, key) == []
