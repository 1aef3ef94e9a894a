"""The Python client for build farms: submit an export, follow it, wait for its result.

from worker.client import Client
client = Client("redis://redis:6379/0")
export_id = client.submit({"source": {...}, "target": {...}})
for snapshot in client.progress(export_id):
    print(snapshot.state, snapshot.bytes_done, "/", snapshot.bytes_total)
result = client.wait(export_id)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, uuid
from celery.result import AsyncResult

from tasks.request import ExportRequest, LocalTargetSpec, parse_request
from tasks.settings import Settings
from tasks.state import alive_key, last_seen_key, load_outcomes
from worker.app import configure

EXPORT_TASK = "cacheship.export"
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED", "LOST"})
# Redis has no trace of the export: it was never submitted there, or Redis lost its data.
LOST = "LOST"


def submitted_key(export_id: str) -> str:
    """Written before the export is enqueued: Redis knows every export it ever accepted."""
    return f"cacheship-submitted-{export_id}"


def export_title(request: ExportRequest) -> str:
    """The export's name in Flower: ``export /srv/caches/app → s3://ci-cache/ app;main``."""
    source = request.source
    origin = source.src if hasattr(source, "src") else f"s3://{source.bucket}/{source.prefix}"
    target = request.target
    if isinstance(target, LocalTargetSpec):
        return f"export {origin} → {target.dest}:{target.tag}"
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


class Client:
    """Talks to the workers through Redis only: the broker and the result backend."""

    def __init__(self, redis_url: str, queue: str = "cacheship") -> None:
        self.app = Celery("cacheship-client")
        configure(self.app, Settings(redis_url=redis_url, queue=queue))

    def submit(self, request: ExportRequest | dict[str, Any] | str) -> str:
        """Validate here (fail fast, before anything is enqueued), then enqueue; returns the id."""
        if not isinstance(request, ExportRequest):
            request = parse_request(request)
        body = request.model_dump(mode="json", by_alias=True)
        export_id = uuid()
        self._redis().set(submitted_key(export_id), "1", ex=self.app.conf.result_expires)
        sent = self.app.send_task(
            EXPORT_TASK, args=[body], task_id=export_id, shadow=export_title(request)
        )
        return str(sent.id)

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
        return AsyncResult(task_id, app=self.app)

    def snapshot(self, export_id: str, with_steps: bool = True) -> Snapshot:
        """Read the export's metadata and, when asked, every step's."""
        res = self._result(export_id)
        state, info = res.state, res.info
        if state == "PENDING" and not self._redis().exists(submitted_key(export_id)):
            return Snapshot(
                export_id=export_id,
                state=LOST,
                error=(
                    f"Redis has no record of export {export_id}: unknown id, lost when Redis "
                    "restarted without persistence, or expired; submit it again (layers "
                    "already stored are skipped)"
                ),
            )
        snap = Snapshot(export_id=export_id, state=state)
        meta: dict[str, Any] = info if isinstance(info, dict) else {}
        if state == "FAILURE":
            snap.error = _error_text(info)
        if state == "SUCCESS":
            snap.result = meta
        snap.phase = str(meta.get("phase", meta.get("status", "")))
        if with_steps:
            steps = meta.get("steps", [])
            names = [s["name"] for s in steps]
            current = meta.get("current")
            # finalize writes config, manifest, then the names: earlier ones are done
            position = (
                names.index(current)
                if current in names
                else (len(names) if current == "writing names" else -1)
            )
            outcomes = self._outcomes(export_id) if steps else {}
            snap.steps = [
                self._step(s, state, meta, outcomes, 0 <= i < position)
                for i, s in enumerate(steps)
            ]
            if not snap.ready:
                self._mark_lost_workers(snap.steps)
        return snap

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

    def _outcomes(self, export_id: str) -> dict[str, dict[str, Any]]:
        """What happened to each finished layer (uploaded, skipped, touched)."""
        try:
            backend: Any = self.app.backend
            return load_outcomes(backend.client, export_id)
        except Exception:
            return {}

    def _step(
        self,
        step: dict[str, Any],
        export_state: str,
        export_meta: dict[str, Any],
        outcomes: dict[str, dict[str, Any]] | None = None,
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
        backend: Any = self.app.backend
        meta = backend.get_task_meta(item.task_id)  # one read: state, result and worker
        item.state = str(meta.get("status", "PENDING"))
        info = meta.get("result")
        if item.state in ("STARTED", "PROGRESS"):
            started_on = meta.get("worker") or (
                info.get("hostname") if isinstance(info, dict) else None
            )
            item.worker = str(started_on) if started_on else None
        if item.state == "SUCCESS":
            outcome = (outcomes or {}).get(item.digest, {})
            item.bytes_done, item.status = item.size, str(outcome.get("action", "done"))
        elif isinstance(info, dict):
            item.bytes_done = int(info.get("bytes_done", 0))
            item.status = str(info.get("status", item.status))
        elif item.state in ("FAILURE", "RETRY"):
            item.error = _error_text(info)
            item.status = "failed" if item.state == "FAILURE" else "retrying"
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
        """The final result, or ExportError with the worker's message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            snap = self.snapshot(export_id, with_steps=False)
            if snap.state == "SUCCESS":
                return snap.result or {}
            if snap.state in READY:
                raise ExportError(snap.error or snap.state)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"export {export_id} not finished after {timeout}s")
            time.sleep(interval)
