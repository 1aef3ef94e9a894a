"""The Celery tasks: thin glue between messages and the domain code.

``export`` plans the whole export and replaces itself with
``chord(group(copy_layer × N), finalize)``; the chord's callback takes over the export's
task id, so a caller follows ONE id from enqueue to the final result.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from celery import Signature, Task, chord, shared_task
from celery.states import SUCCESS
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from tasks import state
from tasks.cacheformat import Descriptor, EmptyCacheError, FormatError
from tasks.copy import CopyOutcome, copy_blob
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
from tasks.request import ExportRequest, LocalSpec, RequestError, S3Spec, parse_request
from tasks.s3client import is_transient
from tasks.settings import Settings, get_settings
from tasks.sources import local as local_source
from tasks.sources import s3 as s3_source
from tasks.sources.common import LoadedCache, SourceError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = get_task_logger(__name__)

PERMANENT = (RequestError, SourceError, FormatError, DigestMismatchError, IngestError)


class ExportFailed(Exception):
    """A permanent failure; the message names the step (and so the layer)."""


def _check_allowed(spec: S3Spec, settings: Settings, role: str) -> None:
    if settings.allowed_buckets and spec.bucket not in settings.allowed_buckets:
        raise RequestError(f"{role}.bucket: {spec.bucket!r} is not in CACHESHIP_ALLOWED_BUCKETS")


def _load(source: LocalSpec | S3Spec, settings: Settings) -> LoadedCache:
    if isinstance(source, LocalSpec):
        return local_source.load(source, settings.source_roots)
    return s3_source.load(source, settings.s3_client(source))


@contextmanager
def _open_blob(source: LocalSpec | S3Spec, digest: str, settings: Settings) -> Iterator[BinaryIO]:
    if isinstance(source, LocalSpec):
        stream = local_source.open_blob(source, settings.source_roots, digest)
    else:
        stream = s3_source.open_blob(source, settings.s3_client(source), digest)
    try:
        yield stream
    finally:
        stream.close()


def _copy(
    req: ExportRequest,
    layer: Descriptor,
    client: S3Client,
    settings: Settings,
    progress: Callable[[int], None] = lambda done: None,
) -> CopyOutcome:
    """One layer from the request's source into its target, with the worker's settings."""
    return copy_blob(
        lambda: _open_blob(req.source, layer.digest, settings),
        client,
        req.target,
        layer,
        head_forbidden=settings.s3_head_forbidden,
        min_part_size=settings.part_size,
        progress=progress,
    )


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
    # Results keep a task's args (result_extended): never the raw request, which may hold
    # what validation refuses (credentials); the validated request replaces it.
    self.request.args = []
    try:
        req = parse_request(request)
        self.request.args = [req.model_dump(mode="json", by_alias=True)]
        _check_allowed(req.target, settings, "target")
        if isinstance(req.source, S3Spec):
            _check_allowed(req.source, settings, "source")
        plan = plan_export(_load(req.source, settings), req.target)
        if isinstance(req.source, LocalSpec):
            # A missing or wrong-sized layer file fails the export before any upload.
            local_source.check_blobs(req.source, settings.source_roots, plan.layers)
    except EmptyCacheError as exc:
        return {"status": "empty", "message": str(exc), "layers": 0, "bytes_sent": 0}
    except PERMANENT as exc:
        raise ExportFailed(str(exc)) from None
    except Exception as exc:
        # Reading an S3 source meets the same transient faults as copying a layer.
        _retry_or_fail(self, exc, "reading the source", settings, args=(request,))

    for warning in plan.warnings:
        logger.warning("export %s: %s", export_id, warning)
    layer_ids = [str(uuid.uuid5(uuid.UUID(export_id), d.digest)) for d in plan.layers]
    steps = _steps(plan, layer_ids, export_id, req.target.image_manifest)
    plan_json = plan.to_json()
    source = req.source.model_dump(mode="json", by_alias=True)
    target = req.target.model_dump(mode="json", by_alias=True)
    state.save_plan(
        _redis(self),
        export_id,
        {"plan": plan_json, "steps": steps, "target": target},
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
    header = _copy_tasks(export_id, source, target, plan_json["layers"], layer_ids, settings)
    raise self.replace(chord(header, finalize.s(export_id)))


def _copy_tasks(
    export_id: str,
    source: dict[str, Any],
    target: dict[str, Any],
    layers: list[dict[str, Any]],
    layer_ids: list[str],
    settings: Settings,
) -> list[Signature[Any]]:
    """A task per large layer; small layers (one PUT each) in batches of ``batch_layers``.

    A task costs some fifty Redis commands (states, events, acks, chord counting) and two
    process hops: more than copying a small blob. A batch copies its blobs with
    ``upload_parallelism`` threads and still gives each layer's task id its final state.
    """
    tasks: list[Signature[Any]] = []
    small: list[tuple[dict[str, Any], str]] = []
    for layer, tid in zip(layers, layer_ids, strict=True):
        if settings.batch_layers > 1 and int(layer["size"]) <= settings.part_size:
            small.append((layer, tid))
        else:
            tasks.append(copy_layer.s(export_id, source, target, layer).set(task_id=tid))
    for start in range(0, len(small), settings.batch_layers):
        chunk = small[start : start + settings.batch_layers]
        if len(chunk) == 1:
            layer, tid = chunk[0]
            tasks.append(copy_layer.s(export_id, source, target, layer).set(task_id=tid))
            continue
        ids = [tid for _, tid in chunk]
        batch_id = str(uuid.uuid5(uuid.UUID(export_id), "batch " + " ".join(ids)))
        tasks.append(
            copy_layers.s(export_id, source, target, [layer for layer, _ in chunk], ids).set(
                task_id=batch_id
            )
        )
    return tasks


@shared_task(bind=True, name="cacheship.copy_layer", max_retries=None)
def copy_layer(
    self: Task[Any, Any],
    export_id: str,
    source: dict[str, Any],
    target: dict[str, Any],
    layer: dict[str, Any],
) -> dict[str, Any]:
    """Copy one blob. The return value is the same on every run (the chord counts by value)."""
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

    # A layer that is done within one interval never publishes PROGRESS: its STARTED and
    # SUCCESS states say it all, and each publication costs Redis round trips per layer.
    throttle = Throttle(publish, settings.progress_interval)
    client = settings.s3_client(req.target)
    try:
        outcome = _copy(req, desc, client, settings, progress=throttle)
    except PERMANENT as exc:
        _give_up(client, req.target, desc.digest)
        raise ExportFailed(f"{step}: {exc}") from None
    except Exception as exc:
        _retry_or_fail(
            self,
            exc,
            step,
            settings,
            on_give_up=lambda: _give_up(client, req.target, desc.digest),
        )

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
    return {"digest": desc.digest, "size": desc.size}


@shared_task(bind=True, name="cacheship.copy_layers", max_retries=None)
def copy_layers(
    self: Task[Any, Any],
    export_id: str,
    source: dict[str, Any],
    target: dict[str, Any],
    layers: list[dict[str, Any]],
    layer_ids: list[str],
) -> list[dict[str, Any]]:
    """Copy a batch of small layers, ``upload_parallelism`` at a time.

    Every layer's own task id gets the state a task of its own would leave (SUCCESS, or
    FAILURE when the batch gives up), so progress reads the same; finished layers are
    recorded together, at most every ``progress_interval`` seconds. A retry runs the whole
    batch again: layers already stored are found by HEAD and skipped. The return value is
    the same on every run (the chord counts by value).
    """
    settings = get_settings()
    req = parse_request({"source": source, "target": target})
    client = settings.s3_client(req.target)
    descs = [desc_from_json(layer) for layer in layers]
    retries = self.request.retries
    backend: Any = self.backend
    lock = threading.Lock()
    done = {"layers": 0, "bytes": 0}
    bytes_total = sum(d.size for d in descs)
    finished: list[tuple[Descriptor, str, CopyOutcome]] = []

    def progress(_: int = 0) -> None:
        """Record the layers finished since the last call (one round trip), send an event."""
        with lock:
            records, finished[:] = list(finished), []
            meta: dict[str, Any] = {
                "export_id": export_id,
                "layers": len(descs),
                "layers_done": done["layers"],
                "bytes_done": done["bytes"],
                "bytes_total": bytes_total,
            }
        _record_batched(backend, export_id, records, settings.result_expires)
        self.send_event("task-progress", result=json.dumps(meta), **meta)

    throttle = Throttle(progress, settings.progress_interval)

    def copy_one(desc: Descriptor, tid: str) -> Exception | None:
        try:
            outcome = _copy(req, desc, client, settings)
        except Exception as exc:
            return exc
        with lock:
            finished.append((desc, tid, outcome))
            done["layers"] += 1
            done["bytes"] += desc.size
        throttle(0)
        return None

    workers = max(1, min(req.target.upload_parallelism, len(descs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(pool.map(copy_one, descs, layer_ids))
    progress()
    failed = [(d, tid, e) for d, tid, e in zip(descs, layer_ids, errors, strict=True) if e]
    if not failed:
        return [{"digest": d.digest, "size": d.size} for d in descs]
    final = [(d, tid, e) for d, tid, e in failed if not is_transient(e)]
    if not final and retries < settings.copy_max_retries:
        countdown = get_exponential_backoff_interval(2, retries, 60, full_jitter=True)
        raise self.retry(exc=failed[0][2], countdown=countdown) from None
    messages = []
    for desc, tid, exc in failed:
        step = layer_step(desc.digest)
        if isinstance(exc, PERMANENT):
            message = f"{step}: {exc}"
        elif not is_transient(exc) or final:
            message = f"{step}: {type(exc).__name__}: {exc}"
        else:
            message = f"{step}: gave up after {retries} retries: {exc}"
        _give_up(client, req.target, desc.digest)
        backend.mark_as_failure(tid, ExportFailed(message))
        messages.append((is_transient(exc), message))
    raise ExportFailed(sorted(messages)[0][1])


def _record_batched(
    backend: Any,
    export_id: str,
    records: list[tuple[Descriptor, str, CopyOutcome]],
    ttl: int,
) -> None:
    """Batched layers' outcomes and their task ids' SUCCESS states, in one Redis round trip.

    What ``state.record_outcome`` and ``backend.store_result`` would write (and publish)
    for each layer, without their four round trips per layer: nothing else ever writes a
    batched layer's task id.
    """
    if not records:
        return
    outcomes = state.outcomes_key(export_id)
    with backend.client.pipeline() as pipe:
        for desc, tid, outcome in records:
            record = {
                "action": outcome.action,
                "bytes_sent": outcome.bytes_sent,
                "bytes_resumed": outcome.bytes_resumed,
            }
            pipe.hsetnx(outcomes, desc.digest, json.dumps(record, separators=(",", ":")))
            result = {"digest": desc.digest, "size": desc.size, "status": outcome.action}
            meta = backend._get_result_meta(result, SUCCESS, None, None)
            meta["task_id"] = tid
            key, value = backend.get_key_for_task(tid), backend.encode(meta)
            if backend.expires:
                pipe.setex(key, backend.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        pipe.expire(outcomes, ttl)
        pipe.execute()


def _retry_or_fail(
    task: Task[Any, Any],
    exc: Exception,
    what: str,
    settings: Settings,
    on_give_up: Callable[[], None] = lambda: None,
    args: tuple[Any, ...] | None = None,
) -> NoReturn:
    """Retry a transient error later (jittered exponential backoff); fail for good otherwise.

    Retrying through Celery, not in a loop here, frees the worker process while it waits and
    survives the worker's death: the retry is a message in Redis.
    """
    retries = task.request.retries
    if not is_transient(exc):
        raise ExportFailed(f"{what}: {type(exc).__name__}: {exc}") from None
    if retries >= settings.copy_max_retries:
        on_give_up()
        raise ExportFailed(f"{what}: gave up after {retries} retries: {exc}") from None
    countdown = get_exponential_backoff_interval(2, retries, 60, full_jitter=True)
    raise task.retry(args=args, exc=exc, countdown=countdown) from None


def _give_up(client: Any, target: S3Spec, digest: str) -> None:
    """A layer that will not be retried leaves no unfinished upload behind."""
    key = target.blob_key(digest)
    try:
        for upload_id in open_uploads(client, target.bucket, key):
            client.abort_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload_id)
    except Exception:
        pass


@shared_task(bind=True, name="cacheship.finalize", max_retries=None)
def finalize(
    self: Task[Any, Any], results: list[dict[str, Any] | list[dict[str, Any]]], export_id: str
) -> dict[str, Any]:
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
    client = settings.s3_client(target)
    base = {
        "export_id": export_id,
        "layers": len(plan.layers),
        "bytes_total": plan.bytes_total,
        "steps": steps,
    }

    def publish(phase: str, current: str) -> None:
        self.update_state(state=PROGRESS, meta={**base, "phase": phase, "current": current})

    try:
        reported = {r["digest"] for r in _flatten(results)}
        unaccounted = [d.digest for d in plan.layers if d.digest not in reported]
        if unaccounted:
            raise IncompleteCacheError(f"layers not copied: {', '.join(unaccounted[:5])}")
        publish("verifying", "checking every layer is stored")
        # A recorded outcome was written after S3 itself confirmed the blob (upload completed,
        # or HEAD found it with its size) during this export: only the others are HEADed.
        outcomes = state.load_outcomes(redis, export_id)
        unconfirmed = [d for d in plan.layers if d.digest not in outcomes]
        missing = missing_blobs(client, target, unconfirmed, settings.s3_head_forbidden)
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
        _retry_or_fail(self, exc, "finalize", settings)

    outcomes = state.load_outcomes(redis, export_id)
    # The plan (megabytes for thousands of layers) is dead once the names are written; the
    # result below carries everything a caller reads. A redelivered finalize never runs
    # again: its result is SUCCESS (worker_deduplicate_successful_tasks).
    state.drop_plan(redis, export_id)
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
        # Only when there is something to say (e.g. a config over BuildKit's 1 MiB limit).
        **({"warnings": plan.warnings} if plan.warnings else {}),
    }


def _flatten(results: list[dict[str, Any] | list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Chord results: one dict per ``copy_layer``, a list of them per ``copy_layers``."""
    flat: list[dict[str, Any]] = []
    for item in results:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


__all__ = ["ExportFailed", "copy_layer", "copy_layers", "export", "finalize"]
