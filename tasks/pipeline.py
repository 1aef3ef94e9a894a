"""The Celery tasks: thin glue between messages and the domain code.

``export`` plans the whole export and replaces itself with
``chord(group(copy_layer × N), finalize)``; the chord's callback takes over the export's
task id, so a caller follows ONE id from enqueue to the final result.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from celery import Task, chord, shared_task
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval

from tasks import state
from tasks.cacheformat import Descriptor, EmptyCacheError, FormatError
from tasks.ingester import DigestMismatchError, IngestError, open_uploads
from tasks.plan import ExportPlan, desc_from_json, plan_export
from tasks.progress import (
    PROGRESS,
    Throttle,
    config_step,
    layer_step,
    manifest_step,
    now_iso,
    step_meta,
)
from tasks.publish import IncompleteCacheError, missing_blobs, put_blob, put_names
from tasks.request import LocalSpec, RequestError, S3Spec, parse_request
from tasks.s3client import S3Endpoint, client_for, is_transient
from tasks.sources import local as local_source
from tasks.sources import s3 as s3_source
from tasks.sources.common import LoadedCache, SourceError
from worker.settings import Settings, get_settings

PERMANENT = (RequestError, SourceError, FormatError, DigestMismatchError, IngestError)


class ExportFailed(Exception):
    """A permanent failure; the message names the step (and so the layer)."""


def _endpoint(spec: S3Spec, settings: Settings) -> S3Endpoint:
    return S3Endpoint(
        endpoint_url=spec.endpoint_url or settings.s3_endpoint_url,
        region=spec.region or settings.s3_region,
        use_path_style=(
            settings.s3_use_path_style if spec.use_path_style is None else spec.use_path_style
        ),
        request_checksum=settings.s3_request_checksum,
        max_attempts=settings.s3_max_attempts,
        max_pool_connections=max(32, spec.upload_parallelism * 2),
    )


def _check_allowed(spec: S3Spec, settings: Settings, role: str) -> None:
    if settings.allowed_buckets and spec.bucket not in settings.allowed_buckets:
        raise RequestError(f"{role}.bucket: {spec.bucket!r} is not in CACHESHIP_ALLOWED_BUCKETS")


def _load(source: LocalSpec | S3Spec, settings: Settings) -> LoadedCache:
    if isinstance(source, LocalSpec):
        return local_source.load(source, settings.source_roots)
    return s3_source.load(source, client_for(_endpoint(source, settings)))


@contextmanager
def _open_blob(source: LocalSpec | S3Spec, digest: str, settings: Settings) -> Iterator[BinaryIO]:
    if isinstance(source, LocalSpec):
        stream = local_source.open_blob(source, settings.source_roots, digest)
    else:
        stream = s3_source.open_blob(source, client_for(_endpoint(source, settings)), digest)
    try:
        yield stream
    finally:
        stream.close()


def _redis(task: Task[Any, Any]) -> Any:
    """The result backend's Redis client (bookkeeping lives beside the results)."""
    return task.backend.client  # type: ignore[attr-defined]


def _steps(
    plan: ExportPlan, layer_ids: list[str], export_id: str, image_manifest: bool
) -> list[dict[str, Any]]:
    steps = [
        {
            "name": layer_step(d.digest),
            "task_id": tid,
            "kind": "layer",
            "digest": d.digest,
            "size": d.size,
        }
        for d, tid in zip(plan.layers, layer_ids, strict=True)
    ]
    steps.append(
        {
            "name": config_step(plan.config_desc.digest),
            "task_id": export_id,
            "kind": "config",
            "digest": plan.config_desc.digest,
            "size": plan.config_desc.size,
        }
    )
    steps.append(
        {
            "name": manifest_step(plan.manifest_desc.digest, image_manifest),
            "task_id": export_id,
            "kind": "manifest",
            "digest": plan.manifest_desc.digest,
            "size": plan.manifest_desc.size,
        }
    )
    return steps


@shared_task(bind=True, name="cacheship.export", max_retries=None)
def export(self: Task[Any, Any], request: dict[str, Any]) -> dict[str, Any]:
    """Validate, read and plan; then hand over to the copy chord under this task's id."""
    settings = get_settings()
    export_id = str(self.request.id)
    try:
        req = parse_request(request)
        _check_allowed(req.target, settings, "target")
        if isinstance(req.source, S3Spec):
            _check_allowed(req.source, settings, "source")
        plan = plan_export(_load(req.source, settings), req.target)
    except EmptyCacheError as exc:
        return {"status": "empty", "message": str(exc), "layers": 0, "bytes_sent": 0}
    except PERMANENT as exc:
        raise ExportFailed(str(exc)) from None
    except Exception as exc:
        # Reading an S3 source meets the same transient faults as copying a layer.
        if not is_transient(exc):
            raise ExportFailed(f"reading the source: {type(exc).__name__}: {exc}") from None
        if self.request.retries >= settings.copy_max_retries:
            raise ExportFailed(
                f"reading the source: gave up after {self.request.retries} retries: {exc}"
            ) from None
        countdown = get_exponential_backoff_interval(2, self.request.retries, 60, full_jitter=True)
        raise self.retry(exc=exc, countdown=countdown) from None

    layer_ids = [str(uuid.uuid5(uuid.UUID(export_id), d.digest)) for d in plan.layers]
    steps = _steps(plan, layer_ids, export_id, req.target.image_manifest)
    state.save_plan(
        _redis(self),
        export_id,
        {
            "plan": plan.to_json(),
            "steps": steps,
            "target": req.target.model_dump(mode="json", by_alias=True),
        },
        settings.result_expires,
    )
    self.update_state(
        state=PROGRESS,
        meta={
            "export_id": export_id,
            "phase": "copying",
            "layers": len(plan.layers),
            "bytes_total": plan.bytes_total,
            "steps": steps,
            "started_at": now_iso(),
        },
    )
    source = req.source.model_dump(mode="json", by_alias=True)
    target = req.target.model_dump(mode="json", by_alias=True)
    header = [
        copy_layer.s(export_id, source, target, layer_json).set(task_id=tid)
        for layer_json, tid in zip(plan.to_json()["layers"], layer_ids, strict=True)
    ]
    raise self.replace(chord(header, finalize.s(export_id)))


@shared_task(bind=True, name="cacheship.copy_layer", max_retries=None)
def copy_layer(
    self: Task[Any, Any],
    export_id: str,
    source: dict[str, Any],
    target: dict[str, Any],
    layer: dict[str, Any],
) -> dict[str, Any]:
    """Copy one blob. The return value is the same on every run (the chord counts by value)."""
    from tasks.copy import copy_blob

    settings = get_settings()
    desc: Descriptor = desc_from_json(layer)
    req = parse_request({"source": source, "target": target})
    step = layer_step(desc.digest)
    started = now_iso()

    def publish(done: int, status: str = "copying", **extra: Any) -> None:
        meta = step_meta(
            step,
            export_id=export_id,
            digest=desc.digest,
            bytes_done=done,
            bytes_total=desc.size,
            started_at=started,
            status=status,
            **extra,
        )
        self.update_state(state=PROGRESS, meta=meta)
        # Flower shows a custom event's type as the state (PROGRESS) but only Celery's own
        # task fields; ``result`` carries the same metadata so the task page shows the bytes.
        self.send_event("task-progress", result=json.dumps(meta), **meta)

    throttle = Throttle(publish, settings.progress_interval)
    publish(0, "checking")
    client = client_for(_endpoint(req.target, settings))
    try:
        outcome = copy_blob(
            lambda: _open_blob(req.source, desc.digest, settings),
            client,
            req.target,
            desc,
            head_forbidden=settings.s3_head_forbidden,
            min_part_size=settings.part_size,
            progress=throttle,
        )
    except PERMANENT as exc:
        _give_up(client, req.target, desc.digest)
        raise ExportFailed(f"{step}: {exc}") from None
    except Exception as exc:
        if not is_transient(exc):
            raise ExportFailed(f"{step}: {type(exc).__name__}: {exc}") from None
        if self.request.retries >= settings.copy_max_retries:
            _give_up(client, req.target, desc.digest)
            raise ExportFailed(
                f"{step}: gave up after {self.request.retries} retries: {exc}"
            ) from None
        countdown = get_exponential_backoff_interval(2, self.request.retries, 60, full_jitter=True)
        raise self.retry(exc=exc, countdown=countdown) from None

    state.record_outcome(
        _redis(self),
        export_id,
        desc.digest,
        {
            "action": outcome.action,
            "bytes_sent": outcome.bytes_sent,
            "bytes_resumed": outcome.bytes_resumed,
        },
        settings.result_expires,
    )
    publish(desc.size, outcome.action, completed_at=now_iso())
    return {"digest": desc.digest, "size": desc.size}


def _give_up(client: Any, target: S3Spec, digest: str) -> None:
    """A layer that will not be retried leaves no unfinished upload behind."""
    key = target.blob_key(digest)
    try:
        for upload_id in open_uploads(client, target.bucket, key):
            client.abort_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload_id)
    except Exception:
        pass


@shared_task(bind=True, name="cacheship.finalize", max_retries=None)
def finalize(self: Task[Any, Any], results: list[dict[str, Any]], export_id: str) -> dict[str, Any]:
    """Check every layer, then write config blob, manifest blob and the names, in that order."""
    settings = get_settings()
    redis = _redis(self)
    try:
        stored = state.load_plan(redis, export_id)
    except LookupError as exc:
        raise ExportFailed(str(exc)) from None
    plan = ExportPlan.from_json(stored["plan"])
    target = S3Spec.model_validate(stored["target"])
    steps: list[dict[str, Any]] = stored["steps"]
    client = client_for(_endpoint(target, settings))
    base = {
        "export_id": export_id,
        "layers": len(plan.layers),
        "bytes_total": plan.bytes_total,
        "steps": steps,
    }

    def publish(phase: str, current: str) -> None:
        self.update_state(state=PROGRESS, meta={**base, "phase": phase, "current": current})

    try:
        reported = {r["digest"] for r in results}
        unaccounted = [d.digest for d in plan.layers if d.digest not in reported]
        if unaccounted:
            raise IncompleteCacheError(f"layers not copied: {', '.join(unaccounted[:5])}")
        publish("verifying", "checking every layer is stored")
        missing = missing_blobs(client, target, plan.layers, settings.s3_head_forbidden)
        if missing:
            raise IncompleteCacheError(f"layers missing from the bucket: {', '.join(missing[:5])}")
        config_name, manifest_name = steps[-2]["name"], steps[-1]["name"]
        publish("writing", config_name)
        put_blob(client, target, plan.config_desc, plan.config)
        publish("writing", manifest_name)
        put_blob(client, target, plan.manifest_desc, plan.manifest)
        publish("writing", "writing names")
        keys = put_names(client, target, plan.s3_config)
    except IncompleteCacheError as exc:
        raise ExportFailed(str(exc)) from None
    except Exception as exc:
        if is_transient(exc) and self.request.retries < settings.copy_max_retries:
            countdown = get_exponential_backoff_interval(2, self.request.retries, 60, True)
            raise self.retry(exc=exc, countdown=countdown) from None
        raise ExportFailed(f"finalize: {type(exc).__name__}: {exc}") from None

    outcomes = state.load_outcomes(redis, export_id)
    counts = {"uploaded": 0, "skipped": 0, "touched": 0}
    for item in outcomes.values():
        counts[item["action"]] = counts.get(item["action"], 0) + 1
    return {
        "status": "complete",
        "export_id": export_id,
        "cache.manifest": plan.manifest_desc.to_json(),
        "config": plan.config_desc.digest,
        "bucket": target.bucket,
        "names": keys,
        "layers": len(plan.layers),
        "layers_uploaded": counts["uploaded"],
        "layers_skipped": counts["skipped"],
        "layers_touched": counts["touched"],
        "bytes_total": plan.bytes_total,
        "bytes_sent": sum(int(o["bytes_sent"]) for o in outcomes.values()),
        "bytes_resumed": sum(int(o["bytes_resumed"]) for o in outcomes.values()),
        "steps": steps,
        "completed_at": now_iso(),
    }


__all__ = ["ExportFailed", "Reject", "copy_layer", "export", "finalize"]
