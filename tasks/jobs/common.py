"""What every task module shares: failure types, retries, sources and targets from settings,
and the export's own final state.

An export is followed by ONE id, the ``export`` task's. That task hands the work to a chord
and leaves its state at PROGRESS; whichever task decides the outcome (``finalize`` on
success, the first layer that fails for good) writes the export's final state and sends the
matching task event, so the result backend and Flower both show the export ending SUCCESS or
FAILURE with its reason, under its own name.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from celery import Task
from celery.signals import task_failure, task_revoked
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import OperationalError
from redis import exceptions as redis_errors

from tasks import metrics, watchdog
from tasks.backends.local import source as local_source
from tasks.backends.local.target import LocalTarget
from tasks.backends.registry.allow import check_registry_allowed
from tasks.backends.registry.errors import PermanentRegistryError, TransientRegistryError
from tasks.backends.s3 import source as s3_source
from tasks.backends.s3.client import is_transient
from tasks.backends.s3.target import S3Target
from tasks.backends.source import LoadedCache, SourceError
from tasks.backends.target import DigestMismatchError, IngestError, Target
from tasks.cacheformat import FormatError
from tasks.fleet import inflight, state
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
from tasks.settings import Settings, get_settings
from worker import internals

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from tasks.backends.registry.client import RegistryClient

logger = get_task_logger("tasks.jobs")

PERMANENT = (
    RequestError,
    SourceError,
    FormatError,
    DigestMismatchError,
    IngestError,
    PermanentRegistryError,
)

#: Redis unreachable (redis-py's own classes, not the builtins; kombu wraps them for the
#: broker): after the client's own patience (``CACHESHIP_REDIS_PATIENCE``) ran out. The task
#: is retried (``autoretry_for``), never failed: Redis comes back with its data.
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OperationalError,
)

#: Task options shared by every task of an export.
PATIENT: dict[str, Any] = {"max_retries": None}

#: Failures that lost a task to a Redis outage rather than ending it: the watchdog sends such
#: a task again instead of failing its export.
OUTAGE_NAMES = frozenset({"ConnectionError", "TimeoutError", "OperationalError", "Reject"})


def waits_out_redis(
    func: Callable[..., dict[str, Any]],
) -> Callable[..., dict[str, Any]]:
    """A task body that outlives a Redis outage: should Redis stay unreachable longer than
    the client's own patience, wait for it here (the retry is a message in Redis, which
    could not be sent now), then retry the task."""

    @functools.wraps(func)
    def run(self: Task[Any, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return func(self, *args, **kwargs)
        except REDIS_DOWN as exc:
            wait_for_redis(self, f"{self.name}[{self.request.id}]")
            raise self.retry(exc=exc, countdown=1) from None

    return run


def wait_for_redis(task: Task[Any, Any], what: str) -> None:
    """Block until Redis answers again (each PING is itself retried for the patience)."""
    config = settings()
    deadline = time.monotonic() + config.redis_patience
    logger.warning("%s: Redis unreachable; waiting for it", what)
    while True:
        try:
            redis_of(task).ping()
            return
        except REDIS_DOWN:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


class ExportFailed(Exception):
    """A permanent failure; the message names the step (and so the layer)."""


def settings() -> Settings:
    return get_settings()


def redis_of(task: Task[Any, Any]) -> Any:
    """The result backend's Redis client: bookkeeping lives beside the results."""
    return internals.backend_redis(task.backend)


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
    """A client for the spec's registry, refused unless the operator listed it.

    The registry modules are imported here, on first use: their HTTP library would cost
    every worker process memory (tasks/backends/registry/errors.py)."""
    from tasks.backends.registry.client import client_for

    check_registry_allowed(spec.reference, config.allowed_registries, role)
    return client_for(spec.reference.endpoint_host, spec.registry_insecure)


def load_source(source: LocalSpec | S3Spec | RegistrySpec, config: Settings) -> LoadedCache:
    if isinstance(source, LocalSpec):
        return local_source.load(source, config.source_roots, max_layers=config.max_layers)
    if isinstance(source, RegistrySpec):
        from tasks.backends.registry import source as registry_source

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
        from tasks.backends.registry import source as registry_source

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
    on_tick: Callable[[], None] = lambda: None,
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
        from tasks.backends.registry.target import RegistryTarget

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
        on_tick=on_tick,
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
    if isinstance(exc, REDIS_DOWN):
        # Not the store's fault, and not counted against its retries: wait for Redis.
        wait_for_redis(task, what)
        raise task.retry(args=args, exc=exc, countdown=1) from None
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


def finished_key(export_id: str) -> str:
    return f"cacheship-finished-{export_id}"


def is_finished(redis: Any, export_id: str) -> bool:
    return bool(redis.exists(finished_key(export_id)))


def first_writer(redis: Any, key: str, ttl: int, what: str) -> bool:
    """``SET key NX`` that is safe when the client sends it again after losing its reply.

    The value is this writer's own token (after ``what``): a retried ``SET NX`` that finds
    the key holding our token is our win, not another writer's.
    """
    token = f"{what}:{uuid.uuid4().hex}"
    if redis.set(key, token, nx=True, ex=ttl):
        return True
    held = redis.get(key)
    return (held.decode() if isinstance(held, bytes) else held) == token


def finish_export(
    task: Task[Any, Any], export_id: str, result: dict[str, Any] | None, error: str | None
) -> None:
    """Write the export's final state under its own id and tell Flower, once (see
    :func:`finish`)."""
    finish(task.app, task.request.hostname, export_id, result, error)


def finish(
    app: Any,
    hostname: str | None,
    export_id: str,
    result: dict[str, Any] | None,
    error: str | None,
) -> None:
    """Write the export's final state under its own id and tell Flower, once.

    ``error`` set: FAILURE with that one-line reason, and every layer not yet started is
    cancelled (a layer after a failed one is not copied). Otherwise SUCCESS with ``result``.
    The first caller wins: a later success never overwrites a failure, nor the reverse.
    """
    backend: Any = app.backend
    redis = internals.backend_redis(backend)
    ttl = int(app.conf.result_expires or 7 * 24 * 3600)
    outcome = "1" if error is None else "0"
    if not first_writer(redis, finished_key(export_id), ttl, outcome):
        return
    watchdog.forget(redis, export_id)
    _release(redis, export_id)
    started = export_started_at(redis, export_id)
    runtime = time.time() - started if started else 0.0
    metrics.export_finished("success" if error is None else "failure", runtime if started else None)
    short = settings().layer_results_expires
    if error is None:
        # The layers are said once, in the ledger (written first: whoever sees SUCCESS finds
        # it); the stored result keeps the rest, and the client puts the steps back.
        steps = (result or {}).get("steps")
        ending.fold(backend, export_id, steps, ttl)
        stored = {k: v for k, v in (result or {}).items() if k != "steps"}
        backend.store_result(export_id, stored, "SUCCESS")
        _export_event(app, hostname, export_id, "task-succeeded", result=repr(result),
                      runtime=runtime)
        layers = [s["task_id"] for s in steps or [] if s["kind"] == "layer"]
        ending.sweep(backend, export_id, layers or _layer_task_ids(redis, export_id), short)
        return
    redis.set(cancelled_key(export_id), error, ex=ttl)
    # Layers still queued are dropped where they wait (Flower shows them REVOKED); one that
    # starts anyway sees the cancelled key and stops before copying.
    layer_ids = _layer_task_ids(redis, export_id)
    if layer_ids:
        app.control.revoke(layer_ids)
    ending.fold(backend, export_id, None, ttl)
    backend.store_result(export_id, ExportFailed(error), "FAILURE")
    _export_event(
        app, hostname, export_id, "task-failed", exception=f"ExportFailed({error!r})",
        traceback=""
    )
    ending.sweep(backend, export_id, layer_ids, short)
    logger.warning("export %s failed: %s", export_id, error)


def _release(redis: Any, export_id: str) -> None:
    """The names are written (or never will be): prune may judge these blobs by the names."""
    try:
        target = target_from_json(state.load_plan(redis, export_id)["target"])
        if isinstance(target, S3Spec):
            inflight.release(redis, inflight.scope_of(target), export_id)
    except Exception as exc:  # the registration then lapses with its TTL
        logger.warning("export %s: registration not released: %s", export_id, exc)


def _export_event(
    app: Any, hostname: str | None, export_id: str, kind: str, **fields: Any
) -> None:
    """A task event about the export's id (not the sending task's): Flower's row for it."""
    try:
        with app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(kind, uuid=export_id, **fields)
    except Exception as exc:  # the state is stored: a row in Flower is not worth failing for
        logger.warning("export %s: %s event not sent: %s", export_id, kind, exc)


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
    with internals.backend_redis(backend).pipeline() as pipe:
        for digest, size, task_id in layers:
            pipe.hsetnx(outcomes, digest, encoded)
            internals.store_success(
                pipe, backend, task_id, {"digest": digest, "size": size, **record}, done_at
            )
        pipe.expire(outcomes, ttl)
        pipe.execute()



@task_failure.connect
def _failed_outside_handling(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    args: Any = None, **_: Any,
) -> None:
    """A layer or finalize that failed with an error its own handling did not catch (a bug, a
    Redis error that outlived every retry) fails its export now, with that error.

    Without this the chord records the failure on ``finalize``'s id and the export stays in
    PROGRESS until the watchdog looks. Failures the tasks report themselves (``ExportFailed``)
    have already ended the export; ``finish`` is first-writer-wins anyway.
    """
    name = getattr(sender, "name", "")
    if name not in ("cacheship.copy_layer", "cacheship.finalize") or exception is None:
        return
    if isinstance(exception, ExportFailed) or not args:
        return
    if type(exception).__name__ in OUTAGE_NAMES:
        return  # lost to a Redis outage, not failed: the watchdog sends it again
    export_id = str(args[0] if name == "cacheship.copy_layer" else args[-1])
    what = "finalize" if name == "cacheship.finalize" else f"layer task {task_id}"
    try:
        request = getattr(sender, "request", None)
        finish(sender.app, getattr(request, "hostname", None), export_id, None,
               f"{what}: {type(exception).__name__}: {exception}")
    except Exception as exc:  # the watchdog fails it later
        logger.warning("export %s: failure not recorded: %s", export_id, exc)
