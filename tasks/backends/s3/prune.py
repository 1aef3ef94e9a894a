"""Garbage collection of a cache in BuildKit's S3 layout, safe beside running exports.

BuildKit's S3 exporter never deletes; lifecycle rules delete by age and break live names.
Here a blob goes only when no name references it, it is older than the grace period, and no
in-flight export has announced it (``tasks.fleet.inflight``, rechecked right before every delete
batch). One unreadable name stops everything: its blobs would look unreferenced.

The names are every cache name in the bucket, under any prefix and by any writer
(``tasks.backends.s3.roots``): caches that share one blobs prefix under different manifests prefixes
keep each other's blobs. What a config name references: every layer blob of its config,
and the two small blobs cacheship writes beside the layers for it: the config blob (the
name's config without the layer annotations, normalised) and the manifest blob,
recomputed in all three flavours (Docker list, OCI index, OCI image manifest) since a name
does not say which one its export wrote.

Order of deletion: names first, then blobs, so a crash half-way never leaves a name whose
blobs are gone. Plain Python and boto3: no Celery, no settings.
"""

from __future__ import annotations

import email.utils
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.backends.s3.client import error_code, is_not_found
from tasks.backends.s3.roots import DIGEST, Gone, config_references, is_blob_key, read_root
from tasks.cacheformat import FormatError
from tasks.request import RequestError, S3Spec, error_message, parse_go_duration

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000
# OCI's digest grammar; other keys under the blobs prefix belong to someone else.
_DIGEST = DIGEST


class PruneError(ValueError):
    """The prune cannot run as asked; the message names the option at fault."""


class PruneRequest(BaseModel):
    """A prune as the command line, the schedule and the task message carry it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache: S3Spec
    grace: float = Field(default=24 * 3600.0, ge=0, description="Go duration or seconds.")
    expire_names: float | None = Field(default=None, ge=0, description="Go duration or seconds.")
    keep_names: list[str] = Field(default_factory=list, description="Globs of names to keep.")
    dry_run: bool = False

    @field_validator("grace", "expire_names", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_go_duration(value) if isinstance(value, str) else value

    @field_validator("keep_names")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        try:
            return list(check_globs(value))
        except PruneError as exc:
            raise ValueError(str(exc).removeprefix("--keep-names: ")) from None

    def options(self, parallelism: int = 16) -> PruneOptions:
        return PruneOptions(
            grace=self.grace,
            expire_names=self.expire_names,
            keep_names=tuple(self.keep_names),
            dry_run=self.dry_run,
            parallelism=parallelism,
        )


def parse_prune_request(data: dict[str, Any]) -> PruneRequest:
    """Validate a prune message; errors name the field (``grace: ...``)."""
    try:
        request = PruneRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError(error_message(exc, whole="prune request")) from None
    try:
        check_layout(request.cache)
    except PruneError as exc:
        raise RequestError(str(exc)) from None
    return request


@dataclass(frozen=True)
class PruneOptions:
    """What to collect. Durations are seconds."""

    grace: float = 24 * 3600.0
    expire_names: float | None = None
    keep_names: tuple[str, ...] = ()
    dry_run: bool = False
    parallelism: int = 16
    batch_size: int = DELETE_BATCH


@dataclass(frozen=True)
class PruneProgress:
    """Where a prune stands: ``phase`` and, when countable, ``done`` of ``total``."""

    phase: str
    done: int = 0
    total: int | None = None


class DeleteGuard(Protocol):
    """What a prune asks the fleet before deleting (``tasks.fleet.inflight.PruneLock``)."""

    def protected(self) -> set[str]: ...
    def delete_batch(self) -> AbstractContextManager[set[str]]: ...


@dataclass(frozen=True)
class NameProblem:
    """A name whose config could not be read: nothing is deleted while it exists."""

    name: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass
class PruneReport:
    """What was kept and removed (or, in a dry run, would be)."""

    bucket: str
    prefix: str
    dry_run: bool
    grace: float
    names_kept: list[str] = field(default_factory=list)
    names_removed: list[str] = field(default_factory=list)
    blobs_kept_referenced: int = 0
    blobs_kept_recent: int = 0
    blobs_kept_in_flight: int = 0
    blobs_kept_failed: int = 0
    blobs_removed: int = 0
    bytes_freed: int = 0
    uploads_aborted: int = 0
    uploads_kept: int = 0
    other_keys: int = 0
    roots_elsewhere: list[str] = field(default_factory=list)
    objects_not_names: int = 0
    unreadable: list[NameProblem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def blobs_kept(self) -> int:
        return (
            self.blobs_kept_referenced
            + self.blobs_kept_recent
            + self.blobs_kept_in_flight
            + self.blobs_kept_failed
        )

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "grace_seconds": self.grace,
            "names_kept": sorted(self.names_kept),
            "names_removed": sorted(self.names_removed),
            "blobs_kept": self.blobs_kept,
            "blobs_kept_referenced": self.blobs_kept_referenced,
            "blobs_kept_recent": self.blobs_kept_recent,
            "blobs_kept_in_flight": self.blobs_kept_in_flight,
            "blobs_kept_failed": self.blobs_kept_failed,
            "blobs_removed": self.blobs_removed,
            "bytes_freed": self.bytes_freed,
            "uploads_aborted": self.uploads_aborted,
            "uploads_kept": self.uploads_kept,
            "other_keys": self.other_keys,
            "roots_elsewhere": sorted(self.roots_elsewhere),
            "objects_not_names": self.objects_not_names,
            "unreadable": [
                {"name": p.name, "key": p.key, "message": p.message} for p in self.unreadable
            ],
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class _Object:
    key: str
    size: int
    last_modified: datetime
    etag: str = ""


@dataclass(frozen=True)
class _Upload:
    key: str
    upload_id: str
    initiated: datetime


@dataclass(frozen=True)
class _Candidate:
    digest: str
    key: str
    size: int


def check_layout(spec: S3Spec) -> None:
    """Refuse prefixes whose key spaces overlap: names would be read as blobs or the reverse."""
    blobs = spec.prefix + spec.blobs_prefix
    names = spec.prefix + spec.manifests_prefix
    if blobs.startswith(names) or names.startswith(blobs):
        raise PruneError(
            f"cache.blobs_prefix / cache.manifests_prefix: {blobs!r} and {names!r} overlap; "
            "prune needs them apart"
        )


def check_globs(globs: Sequence[str]) -> tuple[str, ...]:
    """``--keep-names`` patterns: non-empty, no control characters."""
    for glob in globs:
        if not glob or any(ord(ch) < 0x20 for ch in glob):
            raise PruneError(f"--keep-names: {glob[:40]!r} is not a usable pattern")
    return tuple(globs)


def is_kept_name(name: str, globs: Sequence[str]) -> bool:
    """``fnmatch`` rules on the whole name (``*`` also matches ``/``)."""
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


#: Kept under its old name: what a cache config name references (``tasks.backends.s3.roots``).
name_references = config_references


def _server_now(response: Any) -> datetime:
    """The S3 server's clock (its ``Date`` header): grace is measured on the bucket's clock."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return datetime.now(UTC)


def list_objects(client: S3Client, bucket: str, prefix: str) -> tuple[list[_Object], datetime]:
    """Every object under ``prefix`` (pages of 1,000) and the server's time at the start."""
    found: list[_Object] = []
    now: datetime | None = None
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        if now is None:
            now = _server_now(page)
        for item in page.get("Contents", []):
            found.append(
                _Object(
                    item["Key"], int(item["Size"]), item["LastModified"], item.get("ETag", "")
                )
            )
    return found, now or datetime.now(UTC)


def list_uploads(client: S3Client, bucket: str, prefix: str) -> list[_Upload]:
    """Unfinished multipart uploads under ``prefix``."""
    found: list[_Upload] = []
    paginator = client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Uploads", []):
            found.append(_Upload(item["Key"], item["UploadId"], item["Initiated"]))
    return found


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        message = exc.response.get("Error", {}).get("Message", "")
        code = error_code(exc)
        return f"{code}: {message}" if message else code
    return f"{type(exc).__name__}: {exc}"


def _unchanged(client: S3Client, bucket: str, obj: _Object) -> bool:
    """Is the name still the object the listing showed (gone counts as unchanged)?"""
    try:
        head = client.head_object(Bucket=bucket, Key=obj.key)
    except ClientError as exc:
        if is_not_found(exc):
            return True
        raise
    return head.get("ETag", "") == obj.etag and head["LastModified"] <= obj.last_modified


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _delete_keys(client: S3Client, bucket: str, keys: Sequence[str]) -> dict[str, str]:
    """One DeleteObjects request; returns the keys it could not delete, with the reason."""
    response = client.delete_objects(
        Bucket=bucket,
        Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
    )
    return {
        str(err.get("Key", "")): f"{err.get('Code', '')}: {err.get('Message', '')}"
        for err in response.get("Errors", [])
    }


def prune_cache(
    client: S3Client,
    spec: S3Spec,
    guard: DeleteGuard,
    options: PruneOptions,
    on_progress: Callable[[PruneProgress], None] = lambda progress: None,
) -> PruneReport:
    """Collect one cache (``spec``'s bucket and prefixes); ``spec.name`` is not used.

    Raises ``PruneError`` for bad options and lets S3 errors of the listings propagate
    (nothing was deleted then). Problems after deletion started are in ``report.problems``.
    """
    check_layout(spec)
    keep_globs = check_globs(options.keep_names)
    bucket = spec.bucket
    names_prefix = spec.prefix + spec.manifests_prefix
    blobs_prefix = spec.prefix + spec.blobs_prefix
    report = PruneReport(bucket, spec.prefix, options.dry_run, options.grace)

    # One listing of the whole bucket: the roots are every cache name in it, under any
    # prefix (tasks.backends.s3.roots); the blobs are what lies under the collected blobs prefix.
    on_progress(PruneProgress("listing the bucket"))
    everything, now = list_objects(client, bucket, "")
    blobs = [o for o in everything if o.key.startswith(blobs_prefix)]
    outside = [
        o for o in everything
        if not o.key.startswith(blobs_prefix)
        and (o.key.startswith(names_prefix) or not is_blob_key(o.key))
    ]
    del everything
    expired: list[_Object] = []
    live: list[_Object] = []
    for obj in outside:
        own = obj.key.startswith(names_prefix)
        too_old = (
            own
            and options.expire_names is not None
            and obj.last_modified < now - timedelta(seconds=options.expire_names)
        )
        name = obj.key[len(names_prefix) :]
        (expired if too_old and not is_kept_name(name, keep_globs) else live).append(obj)

    on_progress(PruneProgress("reading names", 0, len(live)))
    refs: set[str] = set()
    done = 0

    def label(key: str) -> str:
        """A name of this cache by its name; a root elsewhere by its key."""
        return key[len(names_prefix) :] if key.startswith(names_prefix) else key

    def read(obj: _Object) -> tuple[_Object, frozenset[str] | None, str | None]:
        try:
            root = read_root(
                client,
                bucket,
                obj.key,
                must_be_name=obj.key.startswith(names_prefix),
                blobs_prefix=blobs_prefix,
            )
        except Gone:
            return obj, None, None
        except FormatError as exc:
            return obj, None, f"the name does not parse: {exc}"
        except (ClientError, BotoCoreError) as exc:
            return obj, None, f"cannot be read, and may be a cache name: {_describe(exc)}"
        except Exception as exc:  # whatever it is, this name's blobs are unknown
            return obj, None, f"cannot be read: {type(exc).__name__}: {exc}"
        return obj, None if root is None else root.refs, None

    workers = max(1, min(options.parallelism, len(live) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for obj, found, problem in pool.map(read, live):
            done += 1
            if problem is not None:
                report.unreadable.append(NameProblem(label(obj.key), obj.key, problem))
            elif found is not None:
                refs |= found
                if obj.key.startswith(names_prefix):
                    report.names_kept.append(label(obj.key))
                else:
                    report.roots_elsewhere.append(obj.key)
            elif obj.key.startswith(names_prefix):
                pass  # deleted since the listing
            else:
                report.objects_not_names += 1
            if done % 100 == 0 or done == len(live):
                on_progress(PruneProgress("reading names", done, len(live)))
    if report.unreadable:
        # Its blobs would look unreferenced: delete nothing, not even expired names.
        report.names_kept = [
            label(o.key) for o in live if o.key.startswith(names_prefix)
        ]
        on_progress(PruneProgress("stopped"))
        return report

    on_progress(PruneProgress("listing uploads"))
    blobs_now = now
    uploads = list_uploads(client, bucket, blobs_prefix)
    in_flight = guard.protected()
    cutoff = blobs_now - timedelta(seconds=options.grace)
    candidates: list[_Candidate] = []
    for obj in blobs:
        digest = obj.key[len(blobs_prefix) :]
        if not _DIGEST.match(digest):
            report.other_keys += 1
        elif digest in refs:
            report.blobs_kept_referenced += 1
        elif obj.last_modified > cutoff:
            report.blobs_kept_recent += 1
        elif digest in in_flight:
            report.blobs_kept_in_flight += 1
        else:
            candidates.append(_Candidate(digest, obj.key, obj.size))
    stale: list[tuple[str, _Upload]] = []
    for upload in uploads:
        digest = upload.key[len(blobs_prefix) :]
        if _DIGEST.match(digest) and upload.initiated <= cutoff and digest not in in_flight:
            stale.append((digest, upload))
        else:
            report.uploads_kept += 1

    if options.dry_run:
        report.names_removed = [o.key[len(names_prefix) :] for o in expired]
        report.blobs_removed = len(candidates)
        report.bytes_freed = sum(c.size for c in candidates)
        report.uploads_aborted = len(stale)
        on_progress(PruneProgress("done"))
        return report

    if expired:
        on_progress(PruneProgress("deleting names", 0, len(expired)))
        workers = max(1, min(options.parallelism, len(expired)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rewritten = [o for o, same in zip(expired, pool.map(
                lambda o: _unchanged(client, bucket, o), expired), strict=True) if not same]
        if rewritten:
            # Written again since the listing: it is not old, and its new references are
            # unknown to this prune. Delete nothing; the next run reads it.
            report.names_kept = [label(o.key) for o in outside if o.key.startswith(names_prefix)]
            report.blobs_kept_failed += len(candidates)
            report.problems.append(
                f"{rewritten[0].key} was written again during the prune: nothing deleted"
            )
            return report
        failed: dict[str, str] = {}
        for chunk in _chunks([o.key for o in expired], options.batch_size):
            failed |= _delete_keys(client, bucket, chunk)
        for obj in expired:
            name = obj.key[len(names_prefix) :]
            if obj.key in failed:
                report.problems.append(f"{obj.key}: not deleted: {failed[obj.key]}")
                report.names_kept.append(name)
            else:
                report.names_removed.append(name)
        if failed:
            # A name that stays references blobs this prune counted as unreferenced.
            report.blobs_kept_failed += len(candidates)
            report.problems.append("blobs not collected: some expired names were not deleted")
            return report

    _delete_blobs(client, bucket, guard, candidates, options.batch_size, report, on_progress)
    if not report.problems:
        _abort_uploads(client, bucket, guard, stale, options, report)
    on_progress(PruneProgress("done"))
    return report


def _delete_blobs(
    client: S3Client,
    bucket: str,
    guard: DeleteGuard,
    candidates: Sequence[_Candidate],
    batch_size: int,
    report: PruneReport,
    on_progress: Callable[[PruneProgress], None],
) -> None:
    """DeleteObjects batches; each rechecks the registry while the batch mark is held."""
    done = 0
    on_progress(PruneProgress("deleting blobs", 0, len(candidates)))
    for chunk in _chunks(candidates, batch_size):
        try:
            with guard.delete_batch() as protected:
                doomed = [c for c in chunk if c.digest not in protected]
                report.blobs_kept_in_flight += len(chunk) - len(doomed)
                failed = _delete_keys(client, bucket, [c.key for c in doomed]) if doomed else {}
        except Exception as exc:
            report.problems.append(f"deleting blobs stopped: {_describe(exc)}")
            report.blobs_kept_failed += len(candidates) - done
            return
        for candidate in doomed:
            if candidate.key in failed:
                report.blobs_kept_failed += 1
                report.problems.append(f"{candidate.key}: not deleted: {failed[candidate.key]}")
            else:
                report.blobs_removed += 1
                report.bytes_freed += candidate.size
        done += len(chunk)
        on_progress(PruneProgress("deleting blobs", done, len(candidates)))
    if getattr(guard, "lease_exceeded", False):
        report.problems.append(
            "a delete batch outlived its lease: exports that started meanwhile recheck "
            "their layers before writing names"
        )


def _abort_uploads(
    client: S3Client,
    bucket: str,
    guard: DeleteGuard,
    stale: Sequence[tuple[str, _Upload]],
    options: PruneOptions,
    report: PruneReport,
) -> None:
    """Abort leftover multipart uploads, under the batch mark like deletes (a writer resumes
    an unfinished upload of its blob: aborting a registered one would break it)."""

    def abort(upload: _Upload) -> str | None:
        try:
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload.key, UploadId=upload.upload_id
            )
        except ClientError as exc:
            if is_not_found(exc):
                return None  # completed or aborted meanwhile
            return _describe(exc)
        return None

    for chunk in _chunks(stale, options.batch_size):
        try:
            with guard.delete_batch() as protected:
                doomed = [u for d, u in chunk if d not in protected]
                report.uploads_kept += len(chunk) - len(doomed)
                workers = max(1, min(options.parallelism, len(doomed) or 1))
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    errors = list(pool.map(abort, doomed))
        except Exception as exc:
            report.problems.append(f"aborting uploads stopped: {_describe(exc)}")
            return
        for upload, error in zip(doomed, errors, strict=True):
            if error is None:
                report.uploads_aborted += 1
            else:
                report.uploads_kept += 1
                report.problems.append(f"{upload.key}: upload not aborted: {error}")
