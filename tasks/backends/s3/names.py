"""Writing cache names: plain overwrite (BuildKit's way) or merge on write (``merge=true``).

A merge reads what the name holds, merges the new export into it
(:mod:`tasks.cacheformat.merge`) and writes the result back. Two finalizes merging into one
name at the same moment must not lose either export, so every merge is guarded twice:

- a lease per (endpoint, bucket, key) in Redis, shared by the whole fleet, held around
  read-merge-write (renewed while held, lapsing seconds after its holder dies): the only
  guard on stores that ignore or refuse conditional writes;
- a conditional PUT (``If-Match`` on the ETag read, ``If-None-Match: *`` when the name did
  not exist): the store itself refuses the write if anything changed the name since it was
  read (another fleet sharing the bucket, a lock that expired, BuildKit itself).

Conditions are used only where a probe showed the store checks them
(:mod:`tasks.backends.s3.conditional`); elsewhere (a store or proxy that drops the headers, or
refuses them) the merge runs under the fleet lock only and its result says so. A lost race (412
Precondition Failed, or 409 ConditionalRequestConflict) merges again from the new
contents. A store answering the conditional header with 501 NotImplemented (or 400 naming
the header) gets an unconditional PUT under the lock. A writer that takes no
lock and sends no condition (BuildKit's own exporter) can still overwrite a name between
our read and our write only on stores without conditional writes; after our write it can
overwrite it at any time, as it always could (docs/merge.md).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from botocore.exceptions import ClientError

from tasks.backends.s3.client import is_not_found
from tasks.backends.s3.conditional import PutOutcome, conditional_support, put_if_unchanged
from tasks.backends.s3.publish import missing_blobs
from tasks.backends.target import InvalidStoredConfigError, NameWrite, NameWriteError, now_go
from tasks.cacheformat import FormatError, GoTime, decode_config
from tasks.cacheformat.merge import (
    DEFAULT_MAX_RECORDS,
    MergeLimits,
    merge_configs,
    read_stored,
    stored_blobs,
)
from tasks.fleet.flight import single_flight
from tasks.request import S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


class LockingRedis(Protocol):
    """What redis-py's ``Lock`` needs of a client (``redis.Redis`` satisfies it)."""

    def register_script(self, script: str) -> Any: ...


class NameBusyError(NameWriteError):
    """The lock or the store kept refusing: the name is left as the last writer left it."""


def lock_name(client: S3Client, target: S3Spec, name: str) -> str:
    """One lock per store, bucket and key ((bucket, prefix, name) on one endpoint)."""
    where = f"{client.meta.endpoint_url}\0{target.bucket}\0{target.manifest_key(name)}"
    return f"cacheship-name-{hashlib.sha256(where.encode()).hexdigest()[:32]}"


def read_name(client: S3Client, bucket: str, key: str) -> tuple[bytes, str] | None:
    """The name's bytes and ETag, or None when it does not exist."""
    try:
        answer = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    return answer["Body"].read(), answer["ETag"]


def write_name(
    client: S3Client,
    redis: LockingRedis,
    target: S3Spec,
    name: str,
    s3_config: bytes,
    *,
    now: GoTime | None = None,
    head_forbidden: Literal["upload", "fail"] = "upload",
    conditional: bool = True,
    max_attempts: int = 10,
    on_wait: Callable[[], None] = lambda: None,
    on_pull: Callable[[list[str]], None] = lambda digests: None,
) -> NameWrite:
    """Merge ``s3_config`` (the new export, S3 form) into the name, safely under concurrency.

    The lock is the fleet's lease (:func:`tasks.fleet.flight.single_flight`): renewed while held,
    lapsing seconds after a holder dies. ``conditional=False`` never sends conditions (for
    stores known to mishandle them). ``on_pull(digests)`` gets the stored blobs the merge
    may keep, before they are looked at and before the name is written: the export
    registers them so that a prune leaves them alone (docs/prune.md). Raises
    InvalidStoredConfigError (the name is left as
    it was unless the target says ``merge=replace-invalid``) and NameBusyError.
    """
    key = target.manifest_key(name)
    new = decode_config(s3_config)
    limits = MergeLimits(target.max_records or DEFAULT_MAX_RECORDS, target.max_age)
    note = ""
    if conditional:
        # Proven, not assumed: a store that drops the headers would write anyway.
        support = conditional_support(client, target.bucket, target.prefix + target.blobs_prefix)
        if not support.honoured:
            conditional, note = False, f"{support.detail}; merged under the fleet lock only"
            log.warning("name %s: %s", key, note)
    for attempt in range(1, max_attempts + 1):
        with single_flight(redis, lock_name(client, target, name), on_wait=on_wait):
            stored = read_name(client, target.bucket, key)
            existing, replaced = None, False
            if stored is not None:
                try:
                    existing = read_stored(stored[0])
                except FormatError as exc:
                    if target.merge != "replace-invalid":
                        raise InvalidStoredConfigError(
                            f"name {name!r} ({key}) holds no valid cache config ({exc}); it "
                            "was left as it was (merge=replace-invalid overwrites it)"
                        ) from None
                    replaced = True
            gone = set()
            if existing is not None:
                pulled = stored_blobs(existing, new)
                if pulled:
                    on_pull([d.digest for d in pulled])
                gone = set(missing_blobs(client, target, pulled, head_forbidden))
            merged = merge_configs(existing, new, now=now or now_go(), limits=limits, missing=gone)
            outcome = PutOutcome.UNSUPPORTED
            if conditional:
                etag = None if stored is None else stored[1]
                outcome = put_if_unchanged(client, target.bucket, key, merged.s3_config, etag)
            if outcome is PutOutcome.LOST_RACE:
                log.info("name %s changed while it was merged; merging again", key)
                continue
            if outcome is PutOutcome.UNSUPPORTED:
                client.put_object(Bucket=target.bucket, Key=key, Body=merged.s3_config)
                if conditional and not note:
                    note = (
                        "the store refused the conditional write; merged under the fleet lock only"
                    )
            checked = outcome is PutOutcome.WRITTEN
            return NameWrite(name, key, True, merged.counts, checked, attempt, replaced, note)
    raise NameBusyError(
        f"name {name!r} ({key}) changed under every one of {max_attempts} merges; "
        "it was not written"
    )


def write_names(
    client: S3Client,
    redis: LockingRedis | None,
    target: S3Spec,
    s3_config: bytes,
    on_name: Callable[[NameWrite], None] = lambda write: None,
    **merge_options: Any,
) -> list[NameWrite]:
    """Write every name of the target: overwrite, or merge when the target says ``merge``.

    ``merge_options`` go to :func:`write_name` (``head_forbidden``, ``conditional``...).
    """
    writes = []
    for name in target.name:
        if target.merges:
            if redis is None:
                raise ValueError("merging names needs a Redis client for the name locks")
            write = write_name(client, redis, target, name, s3_config, **merge_options)
        else:
            # BuildKit's way: the last writer wins.
            key = target.manifest_key(name)
            client.put_object(Bucket=target.bucket, Key=key, Body=s3_config)
            write = NameWrite(name, key, False)
        on_name(write)
        writes.append(write)
    return writes


__all__ = [
    "InvalidStoredConfigError",
    "LockingRedis",
    "NameBusyError",
    "NameWrite",
    "NameWriteError",
    "PutOutcome",
    "put_if_unchanged",
    "read_name",
    "write_name",
    "write_names",
]
