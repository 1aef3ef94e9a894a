"""The ``prune`` task: collect one S3 cache on a worker (its credentials, its allow-list).

Thin: validation and the work are ``tasks.backends.s3.prune``; the fleet-wide safety is
``tasks.fleet.inflight`` (the prune lock of the scope, and the in-flight digests rechecked before
every delete batch). Progress is PROGRESS metadata and ``task-progress`` events, like an
export's; the result is the report (``PruneReport.to_json``). A name that cannot be read
fails the task with the reason: nothing was deleted.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery import Task, shared_task

from tasks.backends.s3.prune import PruneError, PruneProgress, parse_prune_request, prune_cache
from tasks.fleet.inflight import RegistryError, RegistryView, acquire_prune, scope_of
from tasks.jobs.common import (
    PERMANENT,
    ExportFailed,
    check_allowed,
    logger,
    redis_of,
    retry_or_fail,
    s3_client,
    settings,
)
from tasks.progress import PROGRESS, now_iso


class PruneFailed(ExportFailed):
    """A prune that deleted nothing more; the message says why."""


def describe(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}"


@shared_task(bind=True, name="cacheship.prune", max_retries=None)
def prune(self: Task[Any, Any], request: dict[str, Any]) -> dict[str, Any]:
    config = settings()
    prune_id = str(self.request.id)
    self.request.args = []
    try:
        req = parse_prune_request(request)
        self.request.args = [req.model_dump(mode="json", by_alias=True)]
        check_allowed(req.cache, config, "cache")
    except PERMANENT as exc:
        raise PruneFailed(str(exc)) from None
    where = describe(req.cache.bucket, req.cache.prefix)
    started = now_iso()
    last: dict[str, Any] = {"phase": "", "at": 0.0}

    def publish(progress: PruneProgress) -> None:
        now = time.monotonic()
        if progress.phase == last["phase"] and now - last["at"] < config.progress_interval:
            return
        last.update(phase=progress.phase, at=now)
        meta: dict[str, Any] = {
            "prune_id": prune_id,
            "cache": where,
            "dry_run": req.dry_run,
            "phase": progress.phase,
            "done": progress.done,
            "total": progress.total,
            "started_at": started,
        }
        self.update_state(state=PROGRESS, meta=meta)
        self.send_event("task-progress", result=json.dumps(meta), **meta)

    client = s3_client(req.cache, config, "cache", "write")
    redis = redis_of(self)
    scope = scope_of(req.cache)
    try:
        if req.dry_run:
            report = prune_cache(client, req.cache, RegistryView(redis, scope),
                                 req.options(), publish)
        else:
            with acquire_prune(redis, scope) as guard:
                report = prune_cache(client, req.cache, guard, req.options(), publish)
    except (PruneError, RegistryError) as exc:
        raise PruneFailed(f"prune {where}: {exc}") from None
    except Exception as exc:
        # Listing and reading delete nothing: a transient fault is retried from the start.
        retry_or_fail(self, exc, f"prune {where}", config, args=(request,))
    if report.unreadable:
        first = report.unreadable[0]
        more = len(report.unreadable) - 1
        raise PruneFailed(
            f"prune {where}: nothing deleted: name {first.name!r} ({first.key}) "
            f"{first.message}" + (f"; and {more} more unreadable names" if more else "")
        )
    result = {"status": "complete", "prune_id": prune_id, "cache": where,
              **report.to_json(), "completed_at": now_iso()}
    for problem in report.problems:
        logger.warning("prune %s: %s", where, problem)
    logger.info(
        "prune %s: %d names removed, %d blobs removed (%d bytes), %d uploads aborted%s",
        where, len(report.names_removed), report.blobs_removed, report.bytes_freed,
        report.uploads_aborted, " (dry run)" if req.dry_run else "",
    )
    return result


__all__ = ["PruneFailed", "prune"]
