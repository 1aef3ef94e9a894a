"""The S3 ingester: containerd's content-ingester contract on top of S3 multipart uploads.

``writer(ref, expected)`` → ``write(bytes)`` … → ``commit(size, digest)``. Bytes are hashed
while they stream; the object appears under the digest's key only when
``CompleteMultipartUpload`` (or the single ``PutObject`` of a small blob) runs, and that runs
only after size and sha256 matched. A mismatch aborts the upload, so nothing ever sits under
a digest's key that does not hold exactly that content.

A writer that finds an unfinished upload for its key resumes it: the caller still streams
every byte (they must be hashed), but parts already stored with the same content are not
sent again. "The same" is judged by a checksum S3 keeps for each part: uploads are created
with ``ChecksumAlgorithm=SHA256``, every part is sent with its SHA-256, and ``ListParts``
gives those back. A part's ETag is no proof (it is not an MD5 under SSE-KMS), so it is used
only where the store lists no checksum, and with checksums turned off
(``CACHESHIP_S3_REQUEST_CHECKSUM=when_required``, for stores that reject them).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError

from tasks.backends.s3.client import error_code, is_not_found
from tasks.backends.target import DigestMismatchError, IngestError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CopySourceTypeDef

MiB = 1024 * 1024
MAX_PARTS = 10_000
MAX_SINGLE_COPY = 5 * 1024 * MiB
COPY_PART = 512 * MiB


@dataclass(frozen=True)
class BlobInfo:
    """What HEAD tells about a stored blob."""

    size: int
    last_modified: datetime


def part_size_for(size: int, minimum: int) -> int:
    """Parts grow with the blob so that none needs more than 10,000 (S3's limit)."""
    needed = -(-size // MAX_PARTS)
    chosen = max(minimum, needed)
    return -(-chosen // MiB) * MiB


def stat(
    client: S3Client, bucket: str, key: str, head_forbidden: Literal["upload", "fail"] = "upload"
) -> BlobInfo | None:
    """HEAD the key. 403 means "no ListBucket right": absent or fatal, as configured."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        if error_code(exc) in ("403", "AccessDenied"):
            if head_forbidden == "upload":
                return None
            raise IngestError(
                f"HEAD {key} answered 403 Forbidden (no s3:ListBucket right?); with "
                "CACHESHIP_S3_HEAD_FORBIDDEN=upload a 403 counts as absent"
            ) from None
        raise
    return BlobInfo(size=int(head["ContentLength"]), last_modified=head["LastModified"])


def touch(client: S3Client, bucket: str, key: str, size: int) -> None:
    """Copy the object onto itself with fresh metadata so lifecycle rules keep it."""
    metadata = {"updated-at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    source: CopySourceTypeDef = {"Bucket": bucket, "Key": key}
    if size < MAX_SINGLE_COPY:
        if checksums_enabled(client):
            # A blob uploaded in parts has a composite checksum of its parts; the copy gets
            # a full-object SHA-256 of its own (some stores otherwise keep the composite
            # value on the copy without its part count, and every checked GET then fails).
            client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource=source,
                MetadataDirective="REPLACE",
                Metadata=metadata,
                ChecksumAlgorithm="SHA256",
            )
        else:
            client.copy_object(
                Bucket=bucket,
                Key=key,
                CopySource=source,
                MetadataDirective="REPLACE",
                Metadata=metadata,
            )
        return
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=metadata)[
        "UploadId"
    ]
    try:
        parts = []
        for number, start in enumerate(range(0, size, COPY_PART), start=1):
            end = min(start + COPY_PART, size) - 1
            result = client.upload_part_copy(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource=source,
                CopySourceRange=f"bytes={start}-{end}",
            )
            parts.append({"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]})
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
        )
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def open_uploads(client: S3Client, bucket: str, key: str) -> list[str]:
    """Upload ids of unfinished multipart uploads of exactly this key."""
    ids: list[str] = []
    paginator = client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket, Prefix=key):
        ids.extend(u["UploadId"] for u in page.get("Uploads", []) if u.get("Key") == key)
    return ids


def _open_uploads_by_algorithm(client: S3Client, bucket: str, key: str) -> list[tuple[str, str]]:
    """Unfinished uploads of exactly this key, with the checksum algorithm each was created
    with (empty when none, or when the store does not say)."""
    found: list[tuple[str, str]] = []
    paginator = client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket, Prefix=key):
        for upload in page.get("Uploads", []):
            if upload.get("Key") == key:
                found.append((upload["UploadId"], str(upload.get("ChecksumAlgorithm") or "")))
    return found


@dataclass(frozen=True)
class StoredPart:
    """A part of an unfinished upload, as ListParts describes it."""

    size: int
    etag: str
    sha256: str | None  # base64, as S3 keeps it; None when the store lists none


def part_sha256(chunk: bytes | bytearray | memoryview) -> str:
    """A part's SHA-256 as S3 takes and lists it (``x-amz-checksum-sha256``: base64)."""
    return base64.b64encode(hashlib.sha256(chunk).digest()).decode()


def same_part(stored: StoredPart, chunk: bytes | bytearray) -> bool:
    """Does the stored part hold ``chunk``? By the checksum S3 kept when it lists one;
    otherwise by the ETag, which is the part's MD5 only on unencrypted or SSE-S3 buckets
    (a false "no" there costs one resend, never a wrong blob)."""
    if stored.size != len(chunk):
        return False
    if stored.sha256 is not None:
        return stored.sha256 == part_sha256(chunk)
    return stored.etag == hashlib.md5(chunk, usedforsecurity=False).hexdigest()


def _stored_parts(
    client: S3Client, bucket: str, key: str, upload_id: str
) -> dict[int, StoredPart]:
    parts: dict[int, StoredPart] = {}
    paginator = client.get_paginator("list_parts")
    for page in paginator.paginate(Bucket=bucket, Key=key, UploadId=upload_id):
        for part in page.get("Parts", []):
            parts[int(part["PartNumber"])] = StoredPart(
                int(part["Size"]),
                str(part["ETag"]).strip('"'),
                part.get("ChecksumSHA256") or None,
            )
    return parts


def checksums_enabled(client: S3Client) -> bool:
    """Whether this client sends request checksums (not ``when_required``)."""
    setting = getattr(client.meta.config, "request_checksum_calculation", None)
    return setting != "when_required"


class BlobWriter:
    """Streams one blob into S3; see the module docstring for the contract."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        key: str,
        expected_digest: str,
        expected_size: int,
        *,
        min_part_size: int = 8 * MiB,
        parallelism: int = 4,
        on_progress: Callable[[int], None] = lambda stored: None,
        tick: float = 0.5,
    ) -> None:
        """``on_progress`` gets the bytes stored so far, from the writing thread, at least
        every ``tick`` seconds while it waits for parts in flight (so a caller can report
        progress of the upload, not of the reading, which runs ahead by the parts in flight).
        """
        self.client, self.bucket, self.key = client, bucket, key
        self.on_progress, self.tick = on_progress, tick
        self.expected_digest, self.expected_size = expected_digest, expected_size
        self.part_size = part_size_for(expected_size, min_part_size)
        self.single = expected_size <= self.part_size
        self._sha = hashlib.sha256()
        self._buffer = bytearray()
        self._offset = 0
        self._next_part = 1
        self._upload_id: str | None = None
        self._stored: dict[int, StoredPart] = {}
        self._etags: dict[int, str] = {}
        self._sha256: dict[int, str] = {}  # per part, when the upload keeps checksums
        self.checksums = checksums_enabled(client)
        self._futures: list[Future[None]] = []
        self._slots = threading.BoundedSemaphore(parallelism)
        self._pool = ThreadPoolExecutor(max_workers=parallelism) if not self.single else None
        self.bytes_sent = 0
        self.bytes_resumed = 0
        self._sent_lock = threading.Lock()
        if not self.single:
            self._resume_or_create()

    def _resume_or_create(self) -> None:
        for upload_id, algorithm in _open_uploads_by_algorithm(
            self.client, self.bucket, self.key
        ):
            if algorithm not in ("", "SHA256"):
                continue  # created with another checksum: its parts cannot be compared
            try:
                self._stored = _stored_parts(self.client, self.bucket, self.key, upload_id)
            except ClientError as exc:
                if is_not_found(exc):
                    continue
                raise
            self._upload_id = upload_id
            # S3 refuses part checksums for an upload created without an algorithm (one
            # from an older writer); a store that does not say which gets none either.
            self.checksums = self.checksums and algorithm == "SHA256"
            return
        if self.checksums:
            created = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ChecksumAlgorithm="SHA256"
            )
        else:
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
        self._upload_id = created["UploadId"]

    @property
    def stored(self) -> int:
        """Bytes the store holds so far: parts sent and acknowledged, or found stored."""
        return self.bytes_sent + self.bytes_resumed

    @property
    def offset(self) -> int:
        """Bytes written so far (hashed, whether sent or found already stored)."""
        return self._offset

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hash and buffer; full parts go to the upload pool (at most ``parallelism`` in flight).

        A write of exactly ``part_size`` bytes (what ``copy_blob`` does) skips the buffer; a
        bytearray is then sent as it is (the caller hands it over and must not reuse it).
        Parts go to botocore as bytearrays because it checksums, signs and sends those in one
        piece, where a bytes body is wrapped in a file object and sent in 8 KiB blocks.
        """
        self._offset += len(data)
        if self._offset > self.expected_size:
            self.abort()
            raise DigestMismatchError(
                f"source has more than the {self.expected_size} bytes its descriptor says"
            )
        self._sha.update(data)
        if not self.single and not self._buffer and len(data) == self.part_size:
            self._submit(data if isinstance(data, bytearray) else bytearray(data))
            return
        self._buffer += data
        while not self.single and len(self._buffer) >= self.part_size:
            with memoryview(self._buffer) as view:
                chunk = bytearray(view[: self.part_size])
            del self._buffer[: self.part_size]
            self._submit(chunk)

    def _submit(self, chunk: bytearray) -> None:
        number = self._next_part
        self._next_part += 1
        stored = self._stored.get(number)
        if stored is not None and same_part(stored, chunk):
            self._etags[number] = stored.etag
            if stored.sha256 is not None:
                self._sha256[number] = stored.sha256
            self.bytes_resumed += len(chunk)
            return
        self._raise_failed_part()
        while not self._slots.acquire(timeout=self.tick):
            self.on_progress(self.stored)
        assert self._pool is not None
        self._futures.append(self._pool.submit(self._send_part, number, chunk))

    def _send_part(self, number: int, chunk: bytearray) -> None:
        try:
            assert self._upload_id is not None
            if self.checksums:
                # Sent with the part and kept by S3 for it: what a resume compares.
                sha256 = part_sha256(chunk)
                result = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=chunk,  # type: ignore[arg-type]  # bytearray is a blob to botocore
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=sha256,
                )
                self._sha256[number] = str(result.get("ChecksumSHA256") or sha256)
            else:
                result = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=chunk,  # type: ignore[arg-type]  # bytearray is a blob to botocore
                )
            self._etags[number] = str(result["ETag"]).strip('"')
            with self._sent_lock:
                self.bytes_sent += len(chunk)
        finally:
            self._slots.release()

    def _raise_failed_part(self) -> None:
        """Raise a sent part's error; forget parts sent fine (a 10,000-part blob stays O(n))."""
        pending = []
        for future in self._futures:
            if not future.done():
                pending.append(future)
            elif future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._futures = pending

    def _check(self, size: int, digest: str) -> None:
        actual = "sha256:" + self._sha.hexdigest()
        if self._offset != size or size != self.expected_size:
            raise DigestMismatchError(
                f"source has {self._offset} bytes, descriptor says {size}"
            )
        if actual != digest or digest != self.expected_digest:
            raise DigestMismatchError(
                f"content does not match its digest (got {actual})"
            )

    def commit(self, size: int, digest: str) -> None:
        """Store the blob if, and only if, it is exactly ``size`` bytes hashing to ``digest``."""
        try:
            self._check(size, digest)
        except DigestMismatchError:
            self.abort()
            raise
        if self.single:
            body = self._buffer
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body)  # type: ignore[arg-type]
            self.bytes_sent += len(body)
            return
        if self._buffer or self._next_part == 1:
            self._submit(self._buffer)
            self._buffer = bytearray()
        self._wait_parts()
        parts: list[dict[str, Any]] = []
        for n, etag in sorted(self._etags.items()):
            part: dict[str, Any] = {"PartNumber": n, "ETag": f'"{etag}"'}
            if n in self._sha256:
                part["ChecksumSHA256"] = self._sha256[n]
            parts.append(part)
        assert self._upload_id is not None
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except ClientError as exc:
            # Another writer of the same blob finished (and verified) first.
            if not is_not_found(exc) or stat(self.client, self.bucket, self.key) is None:
                raise
        finally:
            self._close_pool()
        self._drop_leftovers()

    def _drop_leftovers(self) -> None:
        """The blob is stored: other unfinished uploads of its key are leftovers; abort them.

        They come from a CreateMultipartUpload retried after its answer was lost, or from a
        writer that died; nothing would ever complete them. A writer still sending parts to
        one gets NoSuchUpload, a transient error: its retry finds the blob stored.
        """
        try:
            for upload_id in open_uploads(self.client, self.bucket, self.key):
                with contextlib.suppress(ClientError):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=self.key, UploadId=upload_id
                    )
        except (ClientError, BotoCoreError):
            pass  # best effort: the blob itself is stored and verified

    def _wait_parts(self) -> None:
        try:
            for future in self._futures:
                while True:
                    try:
                        future.result(timeout=self.tick)
                        break
                    except FutureTimeout:
                        self.on_progress(self.stored)
                self.on_progress(self.stored)
        finally:
            self._futures.clear()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Drop the unfinished upload: nothing is stored, no parts are left behind."""
        for future in self._futures:
            future.cancel()
        self._close_pool()
        self._futures.clear()
        if self._upload_id is not None:
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self._upload_id
                )
            except ClientError as exc:
                if not is_not_found(exc):
                    raise
            self._upload_id = None

    def close(self) -> None:
        """Release threads without aborting: an unfinished upload stays resumable."""
        for future in self._futures:
            future.cancel()
        self._close_pool()
