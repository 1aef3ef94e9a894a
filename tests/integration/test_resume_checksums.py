"""Resuming an upload on a bucket whose part ETags are not MD5s (SSE-KMS), by S3's checksums.

The test servers cannot show this on their own: moto lists no part checksums (and its ETags
are MD5s whatever the encryption), SeaweedFS 4.48 lists none either and fails UploadPart
under SSE-KMS. So the fault relay in front of moto answers as S3 does on an SSE-KMS bucket
(``FaultPlan(kms_parts=True)``): part ETags that are not MD5s, and ListParts listing each
part's SHA-256 as it was sent. moto still stores and assembles every byte.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import boto3
from botocore.config import Config

from tasks.backends.s3.ingester import BlobWriter, open_uploads
from tests.faultproxy import FaultPlan, FaultProxy
from tests.integration.test_ingester import MiB, _digest, _feed
from tests.stack import ACCESS_KEY, SECRET_KEY, s3_client
from worker.embedded import ServerProcess


def _client(url: str, checksum: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(request_checksum_calculation=checksum),  # type: ignore[arg-type]
    )


def _interrupted(s3: Any, bucket: str, data: bytes) -> tuple[str, int]:
    """A writer that died after storing some parts: the upload stays open."""
    key = f"blobs/{_digest(data)}"
    first = BlobWriter(s3, bucket, key, _digest(data), len(data), min_part_size=5 * MiB,
                       parallelism=2)
    _feed(first, data[: 16 * MiB])
    first.close()
    assert first.bytes_sent >= 10 * MiB
    return key, first.bytes_sent


def test_a_resume_reuses_parts_whose_etags_are_not_md5s_by_their_checksums(
    s3_server: ServerProcess, bucket: str
) -> None:
    data = os.urandom(23 * MiB)
    with FaultProxy(s3_server.url, FaultPlan(kms_parts=True), max_seconds=300) as proxy:
        s3 = s3_client(proxy.url)
        key, stored = _interrupted(s3, bucket, data)
        # What the resuming writer sees: ETags that prove nothing, checksums that do.
        upload_id = open_uploads(s3, bucket, key)[0]
        listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        for part in listed:
            start = (part["PartNumber"] - 1) * 5 * MiB
            chunk = data[start : start + part["Size"]]
            assert part["ETag"].strip('"') != hashlib.md5(chunk).hexdigest()
            expected = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
            assert part["ChecksumSHA256"] == expected
        parts_before = proxy.stats.operations["UploadPart"]

        second = BlobWriter(s3, bucket, key, _digest(data), len(data), min_part_size=5 * MiB)
        _feed(second, data)
        second.commit(len(data), _digest(data))
        sent = proxy.stats.operations["UploadPart"] - parts_before
        assert proxy.stats.kms_rewrites > 0
    assert second.bytes_resumed == stored
    assert second.bytes_sent == len(data) - stored
    assert sent == -(-(len(data) - stored) // (5 * MiB))
    direct = s3_client(s3_server.url)
    assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert open_uploads(direct, bucket, key) == []


def test_without_checksums_such_parts_are_sent_again(
    s3_server: ServerProcess, bucket: str
) -> None:
    """The same bucket with checksums off (CACHESHIP_S3_REQUEST_CHECKSUM=when_required):
    only the ETag is left to compare, it proves nothing, every part goes again. The blob is
    still exact: a part that cannot be proven is never reused."""
    data = os.urandom(23 * MiB)
    with FaultProxy(s3_server.url, FaultPlan(kms_parts=True), max_seconds=300) as proxy:
        s3 = _client(proxy.url, "when_required")
        key, _ = _interrupted(s3, bucket, data)
        second = BlobWriter(s3, bucket, key, _digest(data), len(data), min_part_size=5 * MiB)
        _feed(second, data)
        second.commit(len(data), _digest(data))
    assert second.bytes_resumed == 0
    assert second.bytes_sent == len(data)
    assert s3_client(s3_server.url).get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_a_stored_part_with_other_bytes_is_sent_again(s3: Any, bucket: str) -> None:
    """Same size, other content: the checksum (or MD5) differs, the part is replaced."""
    data = os.urandom(12 * MiB)
    key = f"blobs/{_digest(data)}"
    wrong = bytearray(data[: 5 * MiB])
    wrong[0] ^= 0xFF
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                   Body=bytes(wrong), ChecksumAlgorithm="SHA256")
    writer = BlobWriter(s3, bucket, key, _digest(data), len(data), min_part_size=5 * MiB)
    _feed(writer, data)
    writer.commit(len(data), _digest(data))
    assert writer.bytes_resumed == 0
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
