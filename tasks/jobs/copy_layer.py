"""The ``copy_layer`` task: one layer blob from the source into the target.

Its return value is the same on every run, because the chord counts finished parts by value:
a layer copied twice (redelivered after its worker vanished) is counted once. What happened
to the layer (uploaded, skipped, touched, bytes) is recorded per export in Redis instead.
"""

from __future__ import annotations

import json
import time
from typing import Any, NoReturn

from celery import Task, shared_task
from celery.exceptions import Ignore
from celery.states import FAILURE

from tasks import metrics, watchdog
from tasks.cacheformat import Descriptor
from tasks.fleet import state
from tasks.jobs.common import (
    PATIENT,
    PERMANENT,
    REDIS_DOWN,
    ExportFailed,
    cancelled,
    finish_export,
    logger,
    open_blob,
    open_target,
    redis_of,
    retry_or_fail,
    settings,
    waits_out_redis,
)
from tasks.plan import desc_from_json
from tasks.progress import PROGRESS, Throttle, layer_step, now_iso, step_meta
from tasks.request import parse_request

#: Seconds between two marks of a running layer's progress for the watchdog.
MOVED_EVERY = 5.0


def layer_title(digest: str, size: int) -> str:
    """The name Flower lists: ``writing layer sha256:23fd46ee1d1a… 3.0 MiB``."""
    return f"writing layer {digest[:19]}… {_size(size)}"


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@shared_task(bind=True, name="cacheship.copy_layer", **PATIENT)
@waits_out_redis
def copy_layer(
    self: Task[Any, Any],
    export_id: str,
    source: dict[str, Any],
    target: dict[str, Any],
    layer: dict[str, Any],
    absent: bool = False,
) -> dict[str, Any]:
    """``absent``: the export's HEAD found no blob; believed on the first run only."""
    config = settings()
    redis = redis_of(self)
    if cancelled(self, export_id) is not None:
        # The export already failed: a layer after a failed one is not copied.
        self.update_state(state="REVOKED", meta={"export_id": export_id, "status": "cancelled"})
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    desc: Descriptor = desc_from_json(layer)
    req = parse_request({"source": source, "target": target})
    step = layer_step(desc.digest)
    started = now_iso()
    watchdog.touch(redis, export_id)  # the export moves: a layer started
    touched = time.monotonic()

    def moved() -> None:
        """Bytes moved, or this layer waits for another export's upload of its blob."""
        nonlocal touched
        if time.monotonic() - touched >= min(MOVED_EVERY, config.stall_timeout / 4):
            touched = time.monotonic()
            watchdog.touch(redis, export_id)

    def publish(done: int, status: str = "copying") -> None:
        meta = step_meta(
            step,
            export_id=export_id,
            digest=desc.digest,
            bytes_done=done,
            bytes_total=desc.size,
            started_at=started,
            status=status,
        )
        self.update_state(state=PROGRESS, meta=meta)
        moved()
        # Flower shows a custom event's type as the state (PROGRESS) but only Celery's own
        # task fields; ``result`` carries the same metadata so the task page shows the bytes.
        try:
            self.send_event("task-progress", result=json.dumps(meta), **meta)
        except REDIS_DOWN as exc:  # a row in Flower is not worth stopping the copy for
            logger.warning("%s: progress event not sent: %s", step, type(exc).__name__)

    # A layer that is done within one interval never publishes PROGRESS: its STARTED and
    # SUCCESS states say it all, and each publication costs Redis round trips per layer.
    throttle = Throttle(publish, config.progress_interval)
    store = open_target(
        req.target,
        config,
        redis,
        on_wait=lambda: publish(0, "waiting for another upload of this blob"),
        source=req.source,
        on_tick=moved,
    )
    began = time.monotonic()
    try:
        with metrics.layer_in_flight():
            outcome = store.copy_layer(
                desc,
                lambda: open_blob(req.source, desc.digest, config),
                throttle,
                known_absent=absent and not self.request.retries,
            )
    except PERMANENT as exc:
        store.abandon(desc.digest)
        _fail(self, export_id, f"{step}: {exc}")
    except Exception as exc:
        try:
            retry_or_fail(self, exc, step, config, on_give_up=lambda: store.abandon(desc.digest))
        except ExportFailed as failed:
            _fail(self, export_id, str(failed))

    seconds = time.monotonic() - began
    metrics.layer_finished(outcome.action, outcome.bytes_sent, desc.size, seconds)
    record = {
        "action": outcome.action,
        "bytes_sent": outcome.bytes_sent,
        "bytes_resumed": outcome.bytes_resumed,
    }
    # The first finished run's record wins and every run returns it: the value stays the
    # same across runs, and Flower's result line says what happened to the layer.
    first = state.record_outcome(redis, export_id, desc.digest, record, config.result_expires)
    watchdog.touch(redis, export_id)
    return {"digest": desc.digest, "size": desc.size, **first}


def _fail(task: Task[Any, Any], export_id: str, message: str) -> NoReturn:
    """This layer failed for good: so has its export (and the layers still queued).

    The layer's own FAILURE is stored before the export's (Celery stores it again as the
    exception leaves the task): whoever sees the export failed finds the layer failed too.
    """
    failure = ExportFailed(message)
    task.backend.store_result(str(task.request.id), failure, FAILURE)
    finish_export(task, export_id, None, message)
    raise failure from None


__all__ = ["copy_layer", "layer_title"]
