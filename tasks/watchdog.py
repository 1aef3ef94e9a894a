"""Exports watched as a whole: every export ends, SUCCESS or FAILURE, with nobody resubmitting.

The chord that carries an export (``copy_layer`` × N, then ``finalize``) can lose its way
with no task left to move it: a worker killed between storing a layer's SUCCESS and counting
it in the chord (the redelivered layer is deduplicated, and never counted), a message lost
in the instant between the queue and the worker's unacked set, an error raised outside a
task's own error handling. Nothing inside the chord can see that; something outside must.

Every export is kept in one sorted set, scored by the time it last moved: a layer started,
published bytes, waited for a blob another export writes, finished; ``finalize`` published a
phase. The workers' watchdog (``worker/watchdog.py``) reads the exports that have not moved
for ``CACHESHIP_STALL_TIMEOUT`` and :func:`review` says what to do with each, from what Redis
holds: the layers' outcomes and task states, and which task messages still exist (queued, or
held by a worker). Missing work is sent again under the same task ids (each part is
idempotent); a failure nobody reported fails the export with its reason; an export driven
again ``CACHESHIP_STALL_REDRIVES`` times without moving fails, naming what is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

ACTIVE_KEY = "cacheship-exports-active"


def redrives_key(export_id: str) -> str:
    return f"cacheship-redrives-{export_id}"


def touch(redis: Any, export_id: str, now: float | None = None, start: bool = False) -> None:
    """The export moved: its stall clock starts again.

    Only ``start`` (the export task, once it has a plan) adds an export to the set; any other
    touch updates one already there, so a layer that ends after its export ended (and was
    forgotten) does not put it back to be looked at again.
    """
    score = {export_id: time.time() if now is None else now}
    if start:
        redis.zadd(ACTIVE_KEY, score)
    else:
        redis.zadd(ACTIVE_KEY, score, xx=True)


def forget(redis: Any, export_id: str) -> None:
    """The export ended: nothing to watch."""
    redis.zrem(ACTIVE_KEY, export_id)


def count_redrive(redis: Any, export_id: str, ttl: int, now: float | None = None) -> int:
    """Count one more re-drive of a stalled export and start its stall clock again.

    The count goes back to 1 when the export moved since the last re-drive (its score is
    newer than that re-drive's own touch): ``CACHESHIP_STALL_REDRIVES`` bounds re-drives
    *without progress between them*, not the stalls of a long export's whole life.
    """
    now = time.time() if now is None else now
    key = redrives_key(export_id)
    raw = redis.get(key)
    count, at = 0, 0.0
    if raw:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        number, _, when = text.partition(":")
        count, at = int(number or 0), float(when or 0)
    score = redis.zscore(ACTIVE_KEY, export_id)
    if score is None or float(score) > at:
        count = 0
    count += 1
    redis.set(key, f"{count}:{now!r}", ex=ttl)
    redis.zadd(ACTIVE_KEY, {export_id: now}, xx=True)
    return count


def stalled(redis: Any, stall_timeout: float, now: float | None = None) -> list[str]:
    """Exports that have not moved for ``stall_timeout`` seconds, oldest first."""
    now = time.time() if now is None else now
    raw = redis.zrangebyscore(ACTIVE_KEY, "-inf", now - stall_timeout)
    return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]


@dataclass
class Review:
    """What to do with one stalled export."""

    #: Fail the export with this reason.
    fail: str | None = None
    #: Steps (from the plan) of layers to send again: no outcome, no message anywhere.
    resend_layers: list[dict[str, Any]] = field(default_factory=list)
    #: Send ``finalize`` again: every layer is accounted for, and it is nowhere.
    resend_finalize: bool = False
    #: Messages for the missing work wait in the queue: slow, not stuck.
    queued: bool = False
    #: What is missing, for the reason of a failure after the last re-drive.
    missing: list[str] = field(default_factory=list)

    @property
    def redrives(self) -> bool:
        return bool(self.resend_layers) or self.resend_finalize


def review(
    steps: list[dict[str, Any]],
    outcomes: set[str],
    states: dict[str, tuple[str, str | None]],
    finalize_id: str,
    queued_ids: set[str],
    held_ids: set[str],
) -> Review:
    """Decide for one stalled export.

    ``steps``: the plan's steps; ``outcomes``: digests with a recorded outcome; ``states``:
    task id -> (state, error) as the result backend holds it (absent: never stored);
    ``queued_ids``/``held_ids``: ids of the task messages waiting in the queue / fetched by a
    worker and not acknowledged yet.
    """
    result = Review()
    layers = [s for s in steps if s["kind"] == "layer"]
    missing = []
    for step in layers:
        if step["digest"] in outcomes:
            continue
        state, error = states.get(step["task_id"], ("PENDING", None))
        if state == "FAILURE":
            result.fail = f"{step['name']}: {error or 'failed'}"
            return result
        missing.append(step)
    if missing:
        result.missing = [s["name"] for s in missing]
        for step in missing:
            tid = step["task_id"]
            if tid in queued_ids:
                result.queued = True
            elif tid not in held_ids:
                result.resend_layers.append(step)
        return result
    state, error = states.get(finalize_id, ("PENDING", None))
    if state == "FAILURE":
        result.fail = f"finalize: {error or 'failed'}"
        return result
    result.missing = ["finalize"]
    if finalize_id in queued_ids:
        result.queued = True
    elif finalize_id not in held_ids:
        result.resend_finalize = True
    return result


def give_up_reason(review: Review, stall_timeout: float, redrives: int) -> str:
    names = ", ".join(review.missing[:3]) + (" …" if len(review.missing) > 3 else "")
    return (
        f"no progress for {stall_timeout:.0f}s after {redrives} re-drives; still missing: "
        f"{names}"
    )
