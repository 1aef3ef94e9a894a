"""The Python client for build farms: submit an export, follow it, wait for its result.

from worker.client import Client
client = Client("redis://redis:6379/0")
export_id = client.submit({"source": {...}, "target": {...}})
for snapshot in client.progress(export_id):
    print(snapshot.state, snapshot.bytes_done, "/", snapshot.bytes_total)
result = client.wait(export_id)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from tasks.fleet.state import alive_key, last_seen_key, outcomes_key, plan_key
from tasks.ledger import Ledger, derived_id, late_key, ledger_key
from tasks.ledger import decode as decode_ledger
from worker.internals import encode, task_message

if TYPE_CHECKING:
    import redis
    from celery import Celery
    from celery.result import AsyncResult

    from tasks.request import ExportRequest

# Celery, boto3 and the settings are imported when first needed, not here: submitting an
# export (the command line's common case) needs only the request models and redis-py.

EXPORT_TASK = "cacheship.export"
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED", "LOST"})
# Redis has no trace of the export: it was never submitted there, or Redis lost its data.
LOST = "LOST"
# tasks.settings' result_expires default (a unit test keeps them equal); the environment's
# CACHESHIP_RESULT_EXPIRES wins, as it does for the workers.
RESULT_EXPIRES = 7 * 24 * 3600
# tasks.settings' redis_patience default (same test); CACHESHIP_REDIS_PATIENCE wins.
REDIS_PATIENCE = 180.0
#: Seconds one read retries by itself before the waiting loop hears of the outage.
READ_PATIENCE = 3.0
#: Seconds between two "waiting for Redis" messages during one outage.
SAY_EVERY = 10.0

logger = logging.getLogger("cacheship.client")


def redis_down_errors() -> tuple[type[BaseException], ...]:
    """redis-py's connection errors and timeouts (not the builtins of the same names)."""
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


class RedisOutage:
    """An outage as a polling loop sees it: say so now and then, give up after patience.

    ``failed(exc)`` after a read that could not reach Redis (raises ``exc`` once the outage
    is older than ``patience``); ``ok()`` after one that did.
    """

    def __init__(self, where: str, patience: float, say: Callable[[str], None]) -> None:
        self.where, self.patience, self.say = where, patience, say
        self.since: float | None = None
        self.said = 0.0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self.said = now, 0.0
        down = now - self.since
        if down > self.patience:
            raise exc
        if not self.said or now - self.said >= SAY_EVERY:
            self.said = now
            self.say(
                f"waiting for Redis at {self.where}: unreachable for {down:.0f}s "
                f"({type(exc).__name__}); giving up after {self.patience:.0f}s"
            )

    def ok(self) -> None:
        if self.since is not None:
            self.say(f"Redis at {self.where} is back after {time.monotonic() - self.since:.0f}s")
            self.since = None


def submitted_key(export_id: str) -> str:
    """Written before the export is enqueued: Redis knows every export it ever accepted."""
    return f"cacheship-submitted-{export_id}"


def export_title(request: ExportRequest) -> str:
    """The export's name in Flower: ``export /srv/caches/app → s3://ci-cache/ app;main``."""
    from tasks.request import LocalTargetSpec, RegistrySpec

    source = request.source
    if isinstance(source, RegistrySpec):
        origin = str(source.reference)
    else:
        origin = source.src if hasattr(source, "src") else f"s3://{source.bucket}/{source.prefix}"
    target = request.target
    if isinstance(target, LocalTargetSpec):
        return f"export {origin} → {target.dest}:{target.tag}"
    if isinstance(target, RegistrySpec):
        return f"export {origin} → {target.reference}"
    return f"export {origin} → s3://{target.bucket}/{target.prefix} {';'.join(target.name)}"


class ExportError(RuntimeError):
    """The export failed; the message is the worker's (it names the layer or field)."""


@dataclass
class StepStatus:
    """One step (layer, config, manifest) as its task metadata shows it."""

    name: str
    task_id: str
    kind: str
    digest: str
    size: int
    state: str = "PENDING"
    status: str = "waiting"
    bytes_done: int = 0
    error: str | None = None
    worker: str | None = None
    # Running on a worker that stopped renewing its leases: (hostname, seconds since).
    lost_worker: tuple[str, float] | None = None

    @property
    def ready(self) -> bool:
        return self.state in READY


@dataclass
class Snapshot:
    """Where an export stands right now."""

    export_id: str
    state: str
    phase: str = ""
    steps: list[StepStatus] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    #: Wall-clock time (epoch seconds) the export was enqueued, when Redis still knows it:
    #: an elapsed time that survives re-attaching (``cacheship status --wait``).
    submitted_at: float | None = None
    #: What the final task is writing (a step's name, or e.g. "waiting for another merge").
    current: str = ""

    @property
    def bytes_total(self) -> int:
        return sum(s.size for s in self.steps if s.kind == "layer")

    @property
    def bytes_done(self) -> int:
        return sum(s.bytes_done for s in self.steps if s.kind == "layer")

    @property
    def ready(self) -> bool:
        return self.state in READY


def _error_text(value: Any) -> str:
    text = str(value)
    # The chord reports a failed layer as "Dependency <id> raised ExportFailed('...')".
    if "raised ExportFailed(" in text:
        text = text.split("raised ExportFailed(", 1)[1].rstrip(")").strip("'\"")
    return text


PENDING_META: dict[str, Any] = {"status": "PENDING", "result": None}
# Snapshot caches kept per Client: a build farm may follow a few exports at once.
_CACHED_EXPORTS = 8


@dataclass
class _SeenExport:
    """What a Client already read about one export and will not read again.

    A finished layer task's state never changes, and neither does its recorded outcome; the
    export's own metadata changes only a few times (copying, verifying, writing). Keeping
    them makes a poll cost one round trip for the export and one MGET for the layers still
    running, whatever the number of layers.
    """

    raw_meta: bytes | None = None
    meta: dict[str, Any] = field(default_factory=lambda: dict(PENDING_META))
    settled: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)  # the last list seen


def _ledger(raw: bytes | None, late: bytes | None) -> Ledger | None:
    """An ended export's ledger, or None (an export that ended before ledgers were kept)."""
    if not raw:
        return None
    try:
        return decode_ledger(raw, late)
    except ValueError:
        return None


def _ended_metas(ended: Ledger, export_id: str) -> dict[str, dict[str, Any]]:
    """Each layer's final state as its task result would read, from the ledger."""
    metas: dict[str, dict[str, Any]] = {}
    for end in ended.layers:
        result: Any = None
        if end.state == "SUCCESS":
            result = {"digest": end.digest, "size": end.size, "action": end.action}
        elif end.state == "FAILURE":
            result = end.error or "failed"
        metas[derived_id(export_id, end.digest)] = {"status": end.state, "result": result}
    return metas


def _epoch(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # an export submitted before submission times were recorded


class Client:
    """Talks to the workers through Redis only: the broker and the result backend."""

    def __init__(self, redis_url: str, queue: str = "cacheship") -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.result_expires = int(os.environ.get("CACHESHIP_RESULT_EXPIRES", RESULT_EXPIRES))
        self.redis_patience = float(os.environ.get("CACHESHIP_REDIS_PATIENCE", REDIS_PATIENCE))
        self._exports: dict[str, _SeenExport] = {}

    @cached_property
    def app(self) -> Celery:
        """A Celery app configured as the workers' (built on first use: it is slow to import)."""
        from celery import Celery

        from tasks.settings import Settings
        from worker.app import configure, make_patient

        app = Celery("cacheship-client")
        configure(app, Settings(redis_url=self.redis_url, queue=self.queue))
        # Reads go to Redis directly (pipelines, MGET): a blip is retried there; a longer
        # outage is waited out by the loops that follow an export (they say so).
        make_patient(app, READ_PATIENCE)
        return app

    @property
    def where(self) -> str:
        """The Redis address, without credentials."""
        return re.sub(r"//[^@/]*@", "//", self.redis_url)

    def outage(self, say: Callable[[str], None] | None = None) -> RedisOutage:
        """A tracker for one loop's outages (``say``: the Python logger by default)."""
        return RedisOutage(self.where, self.redis_patience, say or logger.warning)

    @cached_property
    def _publisher(self) -> redis.Redis:
        """redis-py alone, retrying as Celery's publishes do (about 17 s: a Redis restart)."""
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        return redis.Redis.from_url(
            self.redis_url,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 12),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )

    def submit(self, request: ExportRequest | dict[str, Any] | str) -> str:
        """Validate here (fail fast, before anything is enqueued), then enqueue; returns the id.

        Refused here with RequestError: a bad request, and an endpoint or bucket the
        allow-lists in this process's environment forbid.

        The submission marker and the task message go in one transaction (one round trip):
        Redis never holds one without the other.
        """
        from tasks.policy import check_request, policy_from_env
        from tasks.request import ExportRequest, parse_request

        if not isinstance(request, ExportRequest):
            request = parse_request(request)
        # The lists of this environment, when it has them (the workers check again).
        check_request(request, policy_from_env())
        body = request.model_dump(mode="json", by_alias=True)
        export_id = str(uuid.uuid4())
        message = task_message(
            EXPORT_TASK, export_id, [body], self.queue, shadow=export_title(request)
        )
        with self._publisher.pipeline(transaction=True) as pipe:
            pipe.set(submitted_key(export_id), f"{time.time():.3f}", ex=self.result_expires)
            pipe.lpush(self.queue, encode(message))
            pipe.execute()
        return export_id

    def _redis(self) -> Any:
        return self.app.backend.client  # type: ignore[attr-defined]

    def lost(self, export_id: str) -> bool:
        """True when Redis has no trace of the export: neither a state nor its submission.

        That happens for an unknown id, when Redis lost its data (restarted without
        persistence) or when the records expired; nothing will ever finish such an export.
        """
        return self._result(export_id).state == "PENDING" and not self._redis().exists(
            submitted_key(export_id)
        )

    def _result(self, task_id: str) -> AsyncResult[Any]:
        return self.app.AsyncResult(task_id)

    def _seen(self, export_id: str) -> _SeenExport:
        seen = self._exports.pop(export_id, None) or _SeenExport()
        self._exports[export_id] = seen  # most recent last
        while len(self._exports) > _CACHED_EXPORTS:
            del self._exports[next(iter(self._exports))]
        return seen

    def _decode(self, raw: bytes | None) -> dict[str, Any]:
        if not raw:
            return dict(PENDING_META)
        backend: Any = self.app.backend
        try:
            meta: dict[str, Any] = backend.decode_result(raw)
        except (KeyError, TypeError, ValueError):
            # A state Celery reads as an exception stored with a plain result (a layer that
            # found its export cancelled is stored REVOKED with its reason): as stored.
            meta = backend.decode(raw)
        return meta

    def snapshot(self, export_id: str, with_steps: bool = True) -> Snapshot:
        """Read the export's metadata and, when asked, every step's.

        Two round trips at most (the export with its submission time and, once it has
        ended, its ledger; the layers still running, in one MGET), a third only when layers
        finished since the last call (their outcomes, in one HMGET): the cost of a poll does
        not grow with finished layers. Once the export has ended, its ledger tells what each
        layer did (their own results expire soon after the end).
        """
        backend: Any = self.app.backend
        redis = self._redis()
        seen = self._seen(export_id)
        with redis.pipeline(transaction=False) as pipe:
            pipe.get(backend.get_key_for_task(export_id))
            pipe.get(submitted_key(export_id))
            pipe.get(ledger_key(export_id))
            pipe.get(late_key(export_id))
            raw_meta, submitted, raw_ledger, raw_late = pipe.execute()
        if raw_meta is None or raw_meta != seen.raw_meta:
            seen.raw_meta, seen.meta = raw_meta, self._decode(raw_meta)
        state, info = str(seen.meta["status"]), seen.meta.get("result")
        ended = _ledger(raw_ledger, raw_late) if state in READY else None
        if state == "PENDING" and submitted is None:
            return Snapshot(
                export_id=export_id,
                state=LOST,
                error=(
                    f"Redis has no record of export {export_id}: unknown id, lost when Redis "
                    "restarted without persistence, or expired; submit it again (layers "
                    "already stored are skipped)"
                ),
            )
        snap = Snapshot(export_id=export_id, state=state, submitted_at=_epoch(submitted))
        meta: dict[str, Any] = info if isinstance(info, dict) else {}
        if state == "FAILURE":
            snap.error = _error_text(info)
        if state == "SUCCESS":
            if ended is not None and "steps" not in meta:
                meta = {**meta, "steps": ended.steps(export_id)}  # as the worker returned it
            snap.result = meta
        snap.phase = str(meta.get("phase", meta.get("status", "")))
        snap.current = str(meta.get("current") or "")
        if with_steps:
            steps = meta.get("steps") or (ended.steps(export_id) if ended is not None else [])
            if steps:
                seen.steps = steps
            elif state == "FAILURE":
                # A failed export's state is its error: its steps are the ones it announced.
                steps = seen.steps or self._planned_steps(export_id)
            names = [s["name"] for s in steps]
            current = meta.get("current")
            # finalize writes config, manifest, then the names: earlier ones are done
            position = (
                names.index(current)
                if current in names
                else (len(names) if current == "writing names" else -1)
            )
            if ended is not None:
                layer_metas, outcomes = _ended_metas(ended, export_id), ended.outcomes()
            else:
                layer_metas = self._layer_metas(seen, export_id, steps)
                outcomes = seen.outcomes
            snap.steps = [
                self._step(s, state, meta, layer_metas, outcomes, 0 <= i < position)
                for i, s in enumerate(steps)
            ]
            if not snap.ready:
                self._mark_lost_workers(snap.steps)
        return snap

    def _planned_steps(self, export_id: str) -> list[dict[str, Any]]:
        """The steps the export stored with its plan (kept when it fails), else none."""
        try:
            raw = self._redis().get(plan_key(export_id))
        except Exception:
            return []
        steps = json.loads(raw).get("steps", []) if raw else []
        return steps if isinstance(steps, list) else []

    def _mark_lost_workers(self, steps: list[StepStatus]) -> None:
        """Say which running layers sit on a worker that is gone, and since when.

        Workers renew a liveness key with their leases (worker/leases.py); a running layer
        whose worker has none is waiting for its lease to lapse, after which another worker
        takes it over.
        """
        running = [s for s in steps if s.kind == "layer" and s.worker and not s.ready]
        hosts = sorted({s.worker for s in running if s.worker})
        if not hosts:
            return
        redis = self._redis()
        with redis.pipeline(transaction=False) as pipe:
            for host in hosts:
                pipe.exists(alive_key(host))
                pipe.get(last_seen_key(host))
            replies = pipe.execute()
        now = time.time()
        gone = {
            host: now - float(seen) if seen else 0.0
            for host, alive, seen in zip(hosts, replies[::2], replies[1::2], strict=True)
            if not alive
        }
        for step in running:
            if step.worker in gone:
                since = gone[step.worker]
                step.lost_worker = (step.worker, since)
                step.status = "worker lost"
                step.error = (
                    f"worker {step.worker} stopped {since:.0f}s ago; another worker takes "
                    "this layer over once its lease lapses (about a minute), resuming its parts"
                )

    def _layer_metas(
        self, seen: _SeenExport, export_id: str, steps: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Every layer task's metadata: settled ones from memory, the rest in one MGET."""
        backend: Any = self.app.backend
        layers = [s for s in steps if s["kind"] == "layer"]
        unsettled = [s["task_id"] for s in layers if s["task_id"] not in seen.settled]
        metas = dict(seen.settled)
        if unsettled:
            raws = self._redis().mget([backend.get_key_for_task(tid) for tid in unsettled])
            for tid, raw in zip(unsettled, raws, strict=True):
                metas[tid] = self._decode(raw)
                if metas[tid]["status"] in READY:
                    seen.settled[tid] = metas[tid]
        missing = [
            s["digest"]
            for s in layers
            if metas[s["task_id"]]["status"] == "SUCCESS" and s["digest"] not in seen.outcomes
        ]
        if missing:
            seen.outcomes.update(self._outcomes(export_id, missing))
        return metas

    def _outcomes(self, export_id: str, digests: list[str]) -> dict[str, dict[str, Any]]:
        """What happened to these finished layers (uploaded, skipped, touched)."""
        try:
            raws = self._redis().hmget(outcomes_key(export_id), digests)
        except Exception:
            return {}
        found: dict[str, dict[str, Any]] = {}
        for digest, raw in zip(digests, raws, strict=True):
            if raw is not None:
                found[digest] = json.loads(raw)
        return found

    def _step(
        self,
        step: dict[str, Any],
        export_state: str,
        export_meta: dict[str, Any],
        layer_metas: dict[str, dict[str, Any]],
        outcomes: dict[str, dict[str, Any]],
        passed: bool = False,
    ) -> StepStatus:
        item = StepStatus(
            name=step["name"],
            task_id=step["task_id"],
            kind=step["kind"],
            digest=step["digest"],
            size=int(step["size"]),
        )
        if item.kind != "layer":
            done = export_state == "SUCCESS" or passed
            current = export_meta.get("current") == item.name
            item.state = "SUCCESS" if done else ("PROGRESS" if current else "PENDING")
            item.status = "done" if done else ("writing" if current else "waiting")
            item.bytes_done = item.size if done else 0
            return item
        layer_meta = layer_metas.get(item.task_id, PENDING_META)
        item.state = str(layer_meta["status"])
        info = layer_meta.get("result")
        if item.state in ("STARTED", "PROGRESS"):
            started_on = layer_meta.get("worker") or (
                info.get("hostname") if isinstance(info, dict) else None
            )
            item.worker = str(started_on) if started_on else None
        if item.state == "SUCCESS":
            outcome = outcomes.get(item.digest, {})
            item.bytes_done, item.status = item.size, str(outcome.get("action", "done"))
        elif item.state == "STARTED":
            item.status = "copying"  # a worker took it (a small layer publishes nothing else)
        elif item.state in ("FAILURE", "RETRY"):  # info: the exception, as a dict
            item.error = _error_text(info)
            item.status = "failed" if item.state == "FAILURE" else "retrying"
        elif isinstance(info, dict):
            item.bytes_done = int(info.get("bytes_done", 0))
            item.status = str(info.get("status", item.status))
        return item

    def progress(self, export_id: str, interval: float = 0.5) -> Iterator[Snapshot]:
        """Snapshots until the export is done (the last one is final)."""
        while True:
            snap = self.snapshot(export_id)
            yield snap
            if snap.ready:
                return
            time.sleep(interval)

    def wait(
        self, export_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> dict[str, Any]:
        """The final result, or ExportError with the worker's message.

        A Redis outage is waited out for ``CACHESHIP_REDIS_PATIENCE`` seconds (180), with a
        warning on the ``cacheship.client`` logger every few seconds; the result is then the
        export's real outcome.

        Wakes as soon as the export's state changes (Celery's Redis backend publishes every
        state it stores on the task's key); ``interval`` only bounds the wait between two
        reads when no message comes (lost detection, a dropped subscription).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = self.outage()
        down = redis_down_errors()
        with self._woken_by(export_id) as pause:
            while True:
                try:
                    snap = self.snapshot(export_id, with_steps=False)
                except down as exc:
                    # Redis restarting: the export goes on meanwhile; wait for it (logged).
                    outage.failed(exc)
                    pause(interval)
                    continue
                outage.ok()
                if snap.state == "SUCCESS":
                    return snap.result or {}
                if snap.state in READY:
                    raise ExportError(snap.error or snap.state)
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    raise TimeoutError(f"export {export_id} not finished after {timeout}s")
                pause(interval if deadline is None else max(0.0, min(interval, deadline - now)))

    @contextmanager
    def _woken_by(self, task_id: str) -> Iterator[Callable[[float], None]]:
        """``pause(seconds)``: returns early when a new state of ``task_id`` is published.

        Subscribed before the first read, so no state stored in between is missed. Without
        a subscription (the server refuses it, the connection drops) it sleeps instead.
        """
        import redis

        key = self.app.backend.get_key_for_task(task_id)  # type: ignore[attr-defined]
        pubsub: Any = None
        try:
            pubsub = self._redis().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(key)
        except (redis.RedisError, OSError):
            pubsub = None

        def pause(seconds: float) -> None:
            nonlocal pubsub
            if pubsub is None:
                time.sleep(seconds)
                return
            started = time.monotonic()
            try:
                if pubsub.get_message(timeout=seconds) is not None:
                    while pubsub.get_message(timeout=0) is not None:
                        pass  # several states at once: one read covers them all
            except (redis.RedisError, OSError):
                pubsub = None
                time.sleep(max(0.0, seconds - (time.monotonic() - started)))

        try:
            yield pause
        finally:
            if pubsub is not None:
                with suppress(redis.RedisError, OSError):
                    pubsub.close()
