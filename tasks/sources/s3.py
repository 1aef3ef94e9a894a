"""A cache already in BuildKit's S3 layout (another bucket, prefix or endpoint).

Read the way BuildKit's S3 importer reads it: the first name's config, layer descriptors
from its annotations, blobs by digest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, cast

from botocore.exceptions import ClientError

from tasks.cacheformat import FormatError, decode_config, descriptors_from_annotations
from tasks.request import S3Spec
from tasks.s3client import is_not_found
from tasks.sources.common import MAX_METADATA_BYTES, LoadedCache, MissingBlobError, SourceError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def load(spec: S3Spec, client: S3Client) -> LoadedCache:
    """Fetch ``manifests/<first name>`` and parse it."""
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
        return LoadedCache(config=config, descriptors=descriptors_from_annotations(config))
    except FormatError as exc:
        raise SourceError(f"source {key}: {exc}") from None


def open_blob(spec: S3Spec, client: S3Client, digest: str) -> BinaryIO:
    """A streaming body of one blob."""
    try:
        obj = client.get_object(Bucket=spec.bucket, Key=spec.blob_key(digest))
    except ClientError as exc:
        if is_not_found(exc):
            raise MissingBlobError("blob missing from the source bucket") from None
        raise
    return cast(BinaryIO, obj["Body"])
