"""A cache already in BuildKit's S3 layout (another bucket, prefix or endpoint).

Read the way BuildKit's S3 importer reads it: the first name's config, layer descriptors
from its annotations, blobs by digest.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from botocore.exceptions import ClientError

from tasks.backends.s3.client import is_not_found, is_transient
from tasks.backends.source import (
    MAX_METADATA_BYTES,
    LoadedCache,
    MissingBlobError,
    SourceError,
    check_layer_count,
)
from tasks.cacheformat import FormatError, decode_config, descriptors_from_annotations
from tasks.request import S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def load(spec: S3Spec, client: S3Client, max_layers: int | None = None) -> LoadedCache:
    """Fetch ``manifests/<first name>`` and parse it; refuse over ``max_layers`` layers."""
    key = spec.manifest_key(spec.name[0])
    try:
        obj = client.get_object(Bucket=spec.bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            raise SourceError(
                f"source: no cache named {spec.name[0]!r} in s3://{spec.bucket}"
            ) from None
        raise
    if int(obj["ContentLength"]) > MAX_METADATA_BYTES:
        raise SourceError(f"source: {key} is larger than {MAX_METADATA_BYTES} bytes")
    data = obj["Body"].read()
    try:
        config = decode_config(data)
        check_layer_count(len(config.layers), max_layers)
        return LoadedCache(config=config, descriptors=descriptors_from_annotations(config))
    except FormatError as exc:
        raise SourceError(f"source {key}: {exc}") from None


#: Times a blob's read may pick up again after its connection broke mid-body.
RESUMES = 5


def open_blob(spec: S3Spec, client: S3Client, digest: str) -> BinaryIO:
    """A streaming body of one blob that resumes (a ranged GET) when its connection breaks."""
    key = spec.blob_key(digest)

    def fetch(offset: int) -> Any:
        try:
            if offset:
                return client.get_object(Bucket=spec.bucket, Key=key, Range=f"bytes={offset}-")[
                    "Body"
                ]
            return client.get_object(Bucket=spec.bucket, Key=key)["Body"]
        except ClientError as exc:
            if is_not_found(exc):
                raise MissingBlobError("blob missing from the source bucket") from None
            raise

    return cast(BinaryIO, ResumingBody(fetch))


class ResumingBody(io.RawIOBase):
    """Reads a body to its end across broken connections, as s3transfer's downloads do.

    A body cut mid-way (reset, short read) costs the whole copy a retry otherwise; here the
    read goes on from the last byte received with a ranged GET, up to ``RESUMES`` times.
    Blobs are content-addressed and every byte is hashed by the writer, so a resumed read
    can only succeed with the right bytes.
    """

    def __init__(self, fetch: Callable[[int], Any], resumes: int = RESUMES) -> None:
        super().__init__()
        self._fetch, self._left = fetch, resumes
        self._offset = 0
        self._body = fetch(0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:
            data = self.read(len(view))
            view[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                data: bytes = self._body.read(size if size >= 0 else None)
            except Exception as exc:
                if self._left <= 0 or not is_transient(exc):
                    raise
                self._left -= 1
                with contextlib.suppress(Exception):
                    self._body.close()
                self._body = self._fetch(self._offset)
                continue
            self._offset += len(data)
            return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()
