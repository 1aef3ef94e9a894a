"""What every task module shares: failure types, retries, sources and targets from settings,
and the export's own final state.

An export is followed by ONE id, the ``export`` task's. That task hands the work to a chord
and leaves its state at PROGRESS; whichever task decides the outcome (``finalize`` on
success, the first layer that fails for good) writes the export's final state and sends the
matching task event, so the result backend and Flower both show the export ending SUCCESS or
FAILURE with its reason, under its own name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from celery import Task
from celery.signals import task_revoked
from celery.states import SUCCESS
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval

from tasks import metrics, registry, state
from tasks.backends.registry import source as registry_source
from tasks.backends.registry.allow import check_registry_allowed
from tasks.backends.registry.client import (
    PermanentRegistryError,
    RegistryClient,
    TransientRegistryError,
    client_for,
)
from tasks.backends.registry.target import RegistryTarget
from tasks.cacheformat import FormatError
from tasks.ingester import DigestMismatchError, IngestError
from tasks.jobs import ending
from tasks.policy import Access, check_spec
from tasks.request import (
    LocalSpec,
    LocalTargetSpec,
    RegistrySpec,
    RequestError,
    S3Spec,
    target_from_json,
)
from tasks.s3client import is_transient
from tasks.settings import Settings, get_settings
from tasks.sources import local as local_source
from tasks.sources import s3 as s3_source
from tasks.sources.common import LoadedCache, SourceError
from tasks.stores.local import LocalTarget
from tasks.targets import S3Target, Target

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = get_task_logger("tasks.jobs")

PERMANENT = (
    RequestError,
    SourceError,
    FormatError,
    DigestMismatchError,
    IngestError,
    PermanentRegistryError,
)


class ExportFailed(Exception):
    """A permanent failure; the message names the step (and so the layer)."""


def settings() -> Settings:
    return get_settings()


def redis_of(task: Task[Any, Any]) -> Any:
    """The result backend's Redis client: bookkeeping lives beside the results."""
    return task.backend.client  # type: ignore[attr-defined]


def cancelled_key(export_id: str) -> str:
    return f"cacheship-cancelled-{export_id}"


def check_allowed(
    spec: S3Spec | RegistrySpec, config: Settings, role: str, access: Access = "write"
) -> None:
    """The operator's lists, before any connection: buckets and endpoints (tasks/policy.py),
    registries (tasks/backends/registry/allow.py); RequestError names the setting."""
    if isinstance(spec, RegistrySpec):
        check_registry_allowed(spec.reference, config.allowed_registries, role)
        return
    check_spec(spec, config.policy(), role, access)


def s3_client(spec: S3Spec, config: Settings, role: str, access: Access) -> S3Client:
    """The only way tasks get an S3 client: checked against the lists every time, and
    connected to the endpoint in the spelling that was compared."""
    endpoint = check_spec(spec, config.policy(), role, access)
    if endpoint != spec.endpoint_url:
        spec = spec.model_copy(update={"endpoint_url": endpoint})
    return config.s3_client(spec)


def registry_client(spec: RegistrySpec, config: Settings, role: str) -> RegistryClient:
    """A client for the spec's registry, refused unless the operator listed it."""
    check_registry_allowed(spec.reference, config.allowed_registries, role)
    return client_for(spec.reference.endpoint_host, spec.registry_insecure)


def load_source(source: LocalSpec | S3Spec | RegistrySpec, config: Settings) -> LoadedCache:
    if isinstance(source, LocalSpec):
        return local_source.load(source, config.source_roots, max_layers=config.max_layers)
    if isinstance(source, RegistrySpec):
        return registry_source.load(
            source, registry_client(source, config, "source"), max_layers=config.max_layers
        )
    return s3_source.load(
        source, s3_client(source, config, "source", "read"), max_layers=config.max_layers
    )


@contextmanager
def open_blob(
    source: LocalSpec | S3Spec | RegistrySpec, digest: str, config: Settings
) -> Iterator[BinaryIO]:
    if isinstance(source, LocalSpec):
        stream = local_source.open_blob(source, config.source_roots, digest)
    elif isinstance(source, RegistrySpec):
        stream = registry_source.open_blob(
            source, registry_client(source, config, "source"), digest
        )
    else:
        stream = s3_source.open_blob(source, s3_client(source, config, "source", "read"), digest)
    try:
        yield stream
    finally:
        stream.close()


def open_target(
    spec: S3Spec | LocalTargetSpec | RegistrySpec,
    config: Settings,
    redis: Any,
    on_wait: Callable[[], None] = lambda: None,
    on_pull: Callable[[list[str]], None] = lambda digests: None,
    source: LocalSpec | S3Spec | RegistrySpec | None = None,
) -> Target:
    """The store an export writes to, configured from the worker's settings.

    A local target is refused here (RequestError, nothing created) when its directory lies
    outside ``CACHESHIP_DEST_ROOTS``; a registry one when ``CACHESHIP_ALLOWED_REGISTRIES``
    does not list it. A registry source on the target's registry (given as ``source``)
    lets layers be mounted instead of copied.
    """
    if isinstance(spec, LocalTargetSpec):
        return LocalTarget(spec, config.dest_roots)
    if isinstance(spec, RegistrySpec):
        mount_from = None
        if (
            isinstance(source, RegistrySpec)
            and source.reference.endpoint_host == spec.reference.endpoint_host
            and source.registry_insecure == spec.registry_insecure
        ):
            mount_from = source.reference.repository
        return RegistryTarget(
            registry_client(spec, config, "target"),
            spec,
            redis,
            chunk_size=config.registry_chunk_size,
            mount_from=mount_from,
            on_wait=on_wait,
        )
    return S3Target(
        s3_client(spec, config, "target", "write"),
        spec,
        redis,
        head_forbidden=config.s3_head_forbidden,
        min_part_size=config.part_size,
        on_wait=on_wait,
        on_pull=on_pull,
    )


def retry_or_fail(
    task: Task[Any, Any],
    exc: Exception,
    what: str,
    config: Settings,
    on_give_up: Callable[[], None] = lambda: None,
    args: tuple[Any, ...] | None = None,
) -> NoReturn:
    """Retry a transient error later (jittered exponential backoff); fail for good otherwise.

    Retrying through Celery, not in a loop here, frees the worker while it waits and survives
    the worker's death: the retry is a message in Redis.
    """
    retries = task.request.retries
    if not (is_transient(exc) or isinstance(exc, TransientRegistryError)):
        on_give_up()
        raise ExportFailed(f"{what}: {type(exc).__name__}: {exc}") from None
    if retries >= config.copy_max_retries:
        on_give_up()
        raise ExportFailed(f"{what}: gave up after {retries} retries: {exc}") from None
    countdown = get_exponential_backoff_interval(2, retries, 60, full_jitter=True)
    metrics.task_retried(task.name)
    raise task.retry(args=args, exc=exc, countdown=countdown) from None


def export_started_at(redis: Any, export_id: str) -> float | None:
    raw = redis.get(f"cacheship-started-{export_id}")
    return float(raw) if raw else None


def mark_started(redis: Any, export_id: str, ttl: int) -> None:
    redis.set(f"cacheship-started-{export_id}", repr(time.time()), ex=ttl, nx=True)


def finish_export(
    task: Task[Any, Any], export_id: str, result: dict[str, Any] | None, error: str | None
) -> None:
    """Write the export's final state under its own id and tell Flower, once.

    ``error`` set: FAILURE with that one-line reason, and every layer not yet started is
    cancelled (a layer after a failed one is not copied). Otherwise SUCCESS with ``result``.
    The first caller wins: a later success never overwrites a failure, nor the reverse.
    """
    redis = redis_of(task)
    ttl = int(task.app.conf.result_expires or 7 * 24 * 3600)
    outcome = "1" if error is None else "0"
    if not redis.set(f"cacheship-finished-{export_id}", outcome, nx=True, ex=ttl):
        return
    _release(redis, export_id)
    started = export_started_at(redis, export_id)
    runtime = time.time() - started if started else 0.0
    metrics.export_finished("success" if error is None else "failure", runtime if started else None)
    backend: Any = task.backend
    short = settings().layer_results_expires
    if error is None:
        # The layers are said once, in the ledger (written first: whoever sees SUCCESS finds
        # it); the stored result keeps the rest, and the client puts the steps back.
        steps = (result or {}).get("steps")
        ending.fold(task, export_id, steps, ttl)
        stored = {k: v for k, v in (result or {}).items() if k != "steps"}
        backend.store_result(export_id, stored, "SUCCESS")
        _export_event(task, export_id, "task-succeeded", result=repr(result), runtime=runtime)
        layers = [s["task_id"] for s in steps or [] if s["kind"] == "layer"]
        ending.sweep(task, export_id, layers or _layer_task_ids(redis, export_id), short)
        return
    redis.set(cancelled_key(export_id), error, ex=ttl)
    # Layers still queued are dropped where they wait (Flower shows them REVOKED); one that
    # starts anyway sees the cancelled key and stops before copying.
    layer_ids = _layer_task_ids(redis, export_id)
    if layer_ids:
        task.app.control.revoke(layer_ids)
    ending.fold(task, export_id, None, ttl)
    backend.store_result(export_id, ExportFailed(error), "FAILURE")
    _export_event(
        task, export_id, "task-failed", exception=f"ExportFailed({error!r})", traceback=""
    )
    ending.sweep(task, export_id, layer_ids, short)
    logger.warning("export %s failed: %s", export_id, error)


def _release(redis: Any, export_id: str) -> None:
    """The names are written (or never will be): prune may judge these blobs by the names."""
    try:
        target = target_from_json(state.load_plan(redis, export_id)["target"])
        if isinstance(target, S3Spec):
            registry.release(redis, registry.scope_of(target), export_id)
    except Exception as exc:  # the registration then lapses with its TTL
        logger.warning("export %s: registration not released: %s", export_id, exc)


def _export_event(task: Task[Any, Any], export_id: str, kind: str, **fields: Any) -> None:
    """A task event about the export's id (not the sending task's): Flower's row for it."""
    with task.app.events.default_dispatcher(hostname=task.request.hostname) as dispatcher:
        dispatcher.send(kind, uuid=export_id, **fields)


def announce_skipped(
    task: Task[Any, Any], layers: list[tuple[str, int, str, str]]
) -> None:
    """Flower rows for layers found stored (digest, size, task id, name), in one message.

    They get no task, so no worker sends their events: these ``task-succeeded`` events
    carry the name and result their task would have had. Buffered as one ``task.multi``
    message, which Celery's event receivers (Flower's too) unpack, so a warm export of
    thousands of layers costs one publish.
    """
    if not layers:
        return
    try:
        with task.app.connection_for_write() as connection:
            dispatcher = task.app.events.Dispatcher(
                connection,
                hostname=task.request.hostname,
                buffer_group=["task"],
                buffer_limit=len(layers) + 1,
            )
            try:
                for digest, size, task_id, name in layers:
                    result = {"digest": digest, "size": size, "action": "skipped",
                              "bytes_sent": 0, "bytes_resumed": 0}
                    dispatcher.send(
                        "task-succeeded", uuid=task_id, name=name, result=repr(result),
                        runtime=0.0,
                    )
                dispatcher.flush()
            finally:
                dispatcher.close()
    except Exception as exc:  # rows in Flower are not worth failing the export for
        logger.warning("skipped layers: events not sent: %s", exc)


@task_revoked.connect
def _revoked_by_name(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    expired: bool = False,
    **_: Any,
) -> None:
    """Give Flower the readable name of a task the worker discarded as revoked.

    A layer revoked while queued never sends ``task-received``, the only event carrying
    its shadow name (``writing layer sha256:…``): Flower's row would keep the type's name
    from ``task-sent`` (``cacheship.copy_layer``). A second ``task-revoked`` says the name.
    """
    shadow = getattr(request, "shadow", None)
    task_id = getattr(request, "id", None)
    if not shadow or not task_id or sender is None:
        return
    try:
        hostname = getattr(request, "hostname", None)
        with sender.app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(
                "task-revoked",
                uuid=task_id,
                name=shadow,
                terminated=terminated,
                signum=signum,
                expired=expired,
            )
    except Exception as exc:  # a name in Flower is not worth failing the worker for
        logger.warning("task %s: revoked event not sent: %s", task_id, exc)


def _layer_task_ids(redis: Any, export_id: str) -> list[str]:
    try:
        stored = state.load_plan(redis, export_id)
    except LookupError:
        return []
    return [s["task_id"] for s in stored["steps"] if s["kind"] == "layer"]


def cancelled(task: Task[Any, Any], export_id: str) -> str | None:
    """The failure that cancelled the export, if any (one Redis GET)."""
    raw = redis_of(task).get(cancelled_key(export_id))
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def record_skipped(
    task: Task[Any, Any], export_id: str, layers: list[tuple[str, int, str]], ttl: int
) -> None:
    """Layers found stored (digest, size, task id): their outcome and SUCCESS, one round trip.

    What each one's ``copy_layer`` would have written had it run and found the blob: the
    ``skipped`` record and a SUCCESS state under the layer's own task id, published like
    any stored state, so status and callers read them the same way.
    """
    if not layers:
        return
    backend: Any = task.backend
    record = {"action": "skipped", "bytes_sent": 0, "bytes_resumed": 0}
    encoded = json.dumps(record, separators=(",", ":"))
    outcomes = state.outcomes_key(export_id)
    done_at = datetime.now(UTC).isoformat()
    with backend.client.pipeline() as pipe:
        for digest, size, task_id in layers:
            pipe.hsetnx(outcomes, digest, encoded)
            meta: dict[str, Any] = {  # the fields Celery's Redis backend stores for a finished task
                "status": SUCCESS,
                "result": {"digest": digest, "size": size, **record},
                "traceback": None,
                "children": [],
                "date_done": done_at,
                "task_id": task_id,
            }
            key, value = backend.get_key_for_task(task_id), backend.encode(meta)
            if backend.expires:
                pipe.setex(key, backend.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
        pipe.expire(outcomes, ttl)
        pipe.execute()

