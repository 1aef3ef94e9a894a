"""Conditional PUTs (``If-Match`` / ``If-None-Match``), and whether a store really checks them.

A merge relies on the store refusing a write when the name changed since it was read. Some
stores, and some proxies in front of AWS, drop those headers and write anyway: the PUT
succeeds and looks checked while a concurrent merge is lost. So before a merge trusts them
for a bucket, a probe shows that the store refuses what it must refuse: a write under
``If-None-Match: *`` to a key that exists, and one under ``If-Match`` with an ETag the key
does not have (and accepts ``If-Match`` with the ETag it has). The answer is kept per
endpoint and bucket for :data:`PROBE_TTL` seconds in each process.

The probe writes and then deletes one small object under the blobs prefix, at a key that is
not a digest (prune leaves such keys alone, BuildKit never reads them).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tasks.backends.s3.client import error_code, is_not_found

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Seconds a probe's answer is trusted (a proxy in front of a store can change).
PROBE_TTL = 3600.0
#: Key of the probe object under the blobs prefix (a token is appended: one per probe).
PROBE_KEY = "cacheship-conditional-write-probe-"
_WRONG_ETAG = '"00000000000000000000000000000000"'


class PutOutcome(Enum):
    WRITTEN = "written"
    LOST_RACE = "lost race"  # the name changed since it was read
    UNSUPPORTED = "unsupported"  # the store refuses conditional writes


def put_if_unchanged(
    client: S3Client, bucket: str, key: str, body: bytes, etag: str | None
) -> PutOutcome:
    """PUT only if the key still has ``etag`` (None: only if it still does not exist)."""
    try:
        if etag is None:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        else:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=etag)
    except ClientError as exc:
        code = error_code(exc)
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return PutOutcome.LOST_RACE
        if etag is not None and is_not_found(exc):
            return PutOutcome.LOST_RACE  # AWS: If-Match on a name deleted since it was read
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if code in ("NotImplemented", "501") or (
            status == 400 and ("If-Match" in message or "If-None-Match" in message)
        ):
            return PutOutcome.UNSUPPORTED
        raise
    return PutOutcome.WRITTEN


@dataclass(frozen=True)
class Support:
    """Whether a store checks conditional PUTs, and what the probe saw."""

    honoured: bool
    detail: str


def probe(client: S3Client, bucket: str, key: str) -> Support:
    """Show, with writes that must be refused, whether the store checks the conditions."""
    body = b"cacheship conditional write probe\n"
    etag = client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
    try:
        steps = (
            ("If-None-Match: * on an existing key", None, PutOutcome.LOST_RACE),
            ("If-Match with an ETag the key does not have", _WRONG_ETAG, PutOutcome.LOST_RACE),
            ("If-Match with the key's own ETag", etag, PutOutcome.WRITTEN),
        )
        for what, condition, expected in steps:
            outcome = put_if_unchanged(client, bucket, key, body, condition)
            if outcome is PutOutcome.UNSUPPORTED:
                return Support(False, f"the store refuses conditional writes ({what})")
            if outcome is not expected:
                verb = "was written" if outcome is PutOutcome.WRITTEN else "was refused"
                return Support(False, f"the store ignores conditional writes: a PUT with "
                                      f"{what} {verb}")
        return Support(True, "the store refuses writes whose If-Match / If-None-Match fail")
    finally:
        with contextlib.suppress(ClientError):
            client.delete_object(Bucket=bucket, Key=key)


_known: dict[tuple[str, str], tuple[float, Support]] = {}
_locks: dict[tuple[str, str], threading.Lock] = {}
_guard = threading.Lock()


def conditional_support(client: S3Client, bucket: str, blobs_prefix: str) -> Support:
    """The probe's answer for this endpoint and bucket: cached, one probe at a time."""
    where = (str(client.meta.endpoint_url), bucket)
    with _guard:
        lock = _locks.setdefault(where, threading.Lock())
    with lock:
        found = _known.get(where)
        if found is not None and time.monotonic() - found[0] < PROBE_TTL:
            return found[1]
        key = f"{blobs_prefix}{PROBE_KEY}{secrets.token_hex(8)}"
        support = probe(client, bucket, key)
        _known[where] = (time.monotonic(), support)
        return support


def forget_probes() -> None:
    """Drop every cached answer (the next merge probes again)."""
    with _guard:
        _known.clear()


__all__ = [
    "PROBE_TTL",
    "PutOutcome",
    "Support",
    "conditional_support",
    "forget_probes",
    "probe",
    "put_if_unchanged",
]
