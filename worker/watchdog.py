"""The workers' watchdog: stalled exports are driven again or failed (``tasks/watchdog.py``).

Every worker runs this thread; one round at a time runs in the whole fleet (a short Redis
lock, written with a token so that a retried ``SET NX`` is never mistaken for losing it). A
round costs one sorted-set read when nothing is stalled. For stalled exports it reads which
task messages exist (the queue, the fetched-and-unacknowledged set: kombu's layout, read in
``worker/internals.py``), the layers' outcomes and states, then acts on :func:`review`'s
answer. Any worker can do it: nothing is tied to the worker that ran the export.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.utils.log import get_logger

from tasks import watchdog as policy
from tasks.fleet import state
from tasks.fleet.flight import Lease
from tasks.jobs.common import OUTAGE_NAMES
from tasks.settings import get_settings
from worker import internals

logger = get_logger(__name__)

ROUND_LOCK = "cacheship-watchdog-round"


def interval(stall_timeout: float) -> float:
    """Seconds between rounds: a stalled export is looked at within a quarter of the timeout."""
    return min(30.0, max(1.0, stall_timeout / 4))


def start(celery: Celery, hostname: str, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(
        target=_loop, args=(celery, hostname, stop), name="watchdog", daemon=True
    )
    thread.start()
    return thread


def _loop(celery: Celery, hostname: str, stop: threading.Event) -> None:
    settings = get_settings()
    every = interval(settings.stall_timeout)
    while not stop.wait(every):
        try:
            run_round(celery, hostname)
        except Exception as exc:  # Redis down, a bug: the next round tries again
            logger.warning("watchdog round failed: %s: %s", type(exc).__name__, exc)


def run_round(celery: Celery, hostname: str) -> list[tuple[str, str]]:
    """One round over the stalled exports; returns (export id, what was done) pairs."""
    settings = get_settings()
    redis = internals.backend_redis(celery.backend)
    if not policy.stalled(redis, settings.stall_timeout):
        return []
    lease = Lease(redis, ROUND_LOCK, ttl=max(30.0, interval(settings.stall_timeout) * 2))
    if not lease.try_acquire():
        return []
    try:
        stalled = policy.stalled(redis, settings.stall_timeout)
        if not stalled:
            return []
        queued = internals.queued_task_ids(redis, settings.queue)
        held = internals.held_task_ids(redis)
        return [(export_id, _one(celery, hostname, redis, export_id, queued, held))
                for export_id in stalled]
    finally:
        lease.release()


def _one(
    celery: Celery, hostname: str, redis: Any, export_id: str, queued: set[str], held: set[str]
) -> str:
    from tasks.jobs.common import finish, is_finished
    from tasks.jobs.export import derived_id

    settings = get_settings()
    if is_finished(redis, export_id):
        policy.forget(redis, export_id)
        return "ended"
    try:
        stored = state.load_plan(redis, export_id)
    except LookupError as exc:
        finish(celery, hostname, export_id, None, str(exc))
        return "failed: no plan"
    steps: list[dict[str, Any]] = stored["steps"]
    finalize_id = derived_id(export_id, "finalize")
    outcomes = set(state.load_outcomes(redis, export_id))
    ids = [s["task_id"] for s in steps if s["kind"] == "layer" and s["digest"] not in outcomes]
    ids.append(finalize_id)
    states = _states(celery, redis, ids)
    review = policy.review(steps, outcomes, states, finalize_id, queued, held)
    if review.fail is not None:
        finish(celery, hostname, export_id, None, review.fail)
        return f"failed: {review.fail}"
    if review.queued and not review.redrives:
        policy.touch(redis, export_id)  # waiting its turn in a busy queue: not stuck
        return "queued"
    count = policy.count_redrive(redis, export_id, settings.result_expires)
    if count > settings.stall_redrives:
        reason = policy.give_up_reason(review, settings.stall_timeout, count - 1)
        finish(celery, hostname, export_id, None, reason)
        return f"failed: {reason}"
    if review.resend_layers:
        _resend_layers(stored, review.resend_layers, export_id)
        logger.warning("export %s: no progress for %.0fs; %d layers sent again", export_id,
                       settings.stall_timeout, len(review.resend_layers))
        return f"resent {len(review.resend_layers)} layers"
    if review.resend_finalize:
        _resend_finalize(stored, export_id, finalize_id)
        logger.warning("export %s: no progress for %.0fs; finalize sent again", export_id,
                       settings.stall_timeout)
        return "resent finalize"
    logger.warning("export %s: no progress for %.0fs; its tasks are held by workers "
                   "(round %d of %d)", export_id, settings.stall_timeout, count,
                   settings.stall_redrives)
    return "held"


def _states(celery: Celery, redis: Any, task_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    backend: Any = celery.backend
    raws = redis.mget([internals.result_key(backend, tid) for tid in task_ids])
    found: dict[str, tuple[str, str | None]] = {}
    for tid, raw in zip(task_ids, raws, strict=True):
        meta = internals.decode_meta(backend, raw)
        if meta is None:
            continue
        status = str(meta.get("status"))
        error = None
        if status == "FAILURE":
            result = meta.get("result")
            kind = str(result.get("exc_type", "")) if isinstance(result, dict) else ""
            if kind in OUTAGE_NAMES:
                status = "LOST"  # lost to a Redis outage: sent again, not a failure
            elif isinstance(result, dict):
                error = f"{kind or 'Error'}: {result.get('exc_message', '')}"
            else:
                error = str(result)
        found[tid] = (status, error)
    return found


def _resend_layers(stored: dict[str, Any], steps: list[dict[str, Any]], export_id: str) -> None:
    """The same ``copy_layer`` messages, under the same ids, outside the chord: ``finalize``
    is sent by a later round once every layer is accounted for."""
    from tasks.jobs.copy_layer import copy_layer, layer_title

    layers = {layer["digest"]: layer for layer in stored["plan"]["layers"]}
    for step in steps:
        layer = layers[step["digest"]]
        copy_layer.apply_async(
            (export_id, stored["source"], stored["target"], layer),
            task_id=step["task_id"],
            shadow=layer_title(layer["digest"], layer["size"]),
        )


def _resend_finalize(stored: dict[str, Any], export_id: str, finalize_id: str) -> None:
    from tasks.jobs.export import describe
    from tasks.jobs.finalize import finalize
    from tasks.request import target_from_json

    finalize.apply_async(
        ([], export_id),
        task_id=finalize_id,
        shadow=f"finalize {describe(target_from_json(stored['target']))}",
    )
