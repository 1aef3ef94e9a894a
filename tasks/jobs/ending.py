"""What an export leaves in Redis once it has ended: its ledger, and nothing per layer for long.

While an export runs, every layer has its Celery result (about 2 KB: Celery keeps the task's
arguments), an outcome record, and the chord counts parts in its own keys. When the export
ends, ``fold`` writes the ledger (one line per layer, ``tasks/ledger.py``) before the export's
final state, so whoever sees that state finds the ledger; then ``sweep`` gives everything kept
per layer ``CACHESHIP_LAYER_RESULTS_EXPIRES`` to live instead of ``CACHESHIP_RESULT_EXPIRES``.

Some writes come after the end: the chord's body stores its own result after it ended the
export, a layer still running when its export failed stores its state when it stops, and a
layer discarded as revoked is stored REVOKED by the worker that drops it. The signal handlers
below shorten those too, and a layer that finishes after the end adds its line to the
export's late ledger (``tasks/ledger.py``). Checking whether the export has ended costs one
Redis round trip per task.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, task_revoked
from celery.states import FAILURE, IGNORED, PENDING, RETRY, REVOKED, SUCCESS
from celery.utils.log import get_task_logger

from tasks import ledger
from tasks.fleet import state
from tasks.settings import get_settings

logger = get_task_logger("tasks.jobs")

COPY_LAYER = "cacheship.copy_layer"
FINALIZE = "cacheship.finalize"


def finished_key(export_id: str) -> str:
    return f"cacheship-finished-{export_id}"


def dispatched_key(export_id: str) -> str:
    return f"cacheship-dispatched-{export_id}"


def fold(backend: Any, export_id: str, steps: list[dict[str, Any]] | None, ttl: int) -> None:
    """Write the export's ledger from its steps, outcomes and (after a failure) layer states.

    ``steps`` None: read them from the stored plan (a failed export; none when it never
    planned). Never fails the export: without a ledger, readers fall back on what is left.
    """
    redis: Any = backend.client
    try:
        if steps is None:
            steps = list(state.load_plan(redis, export_id)["steps"])
        layers = [s for s in steps if s["kind"] == "layer"]
        outcomes = state.load_outcomes(redis, export_id)
        metas = _layer_states(backend, layers) if len(outcomes) < len(layers) else {}
        ends = [_end(s, outcomes.get(s["digest"]), metas.get(s["task_id"])) for s in layers]
        others = [s for s in steps if s["kind"] != "layer"]
        redis.set(ledger.ledger_key(export_id), ledger.encode(others, ends), ex=ttl)
    except LookupError:
        return  # no plan: the export failed before it had layers
    except Exception as exc:
        logger.warning("export %s: ledger not written: %s", export_id, exc)


def _layer_states(backend: Any, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Each layer task's stored state and result, by task id (one MGET)."""
    ids = [s["task_id"] for s in layers]
    raws = backend.client.mget([backend.get_key_for_task(tid) for tid in ids])
    return {tid: backend.decode_result(raw) for tid, raw in zip(ids, raws, strict=True) if raw}


def _end(
    step: dict[str, Any], outcome: dict[str, Any] | None, meta: dict[str, Any] | None
) -> ledger.LayerEnd:
    digest, size = str(step["digest"]), int(step["size"])
    if outcome is not None:  # written once the store confirmed the blob
        return ledger.LayerEnd(
            digest=digest,
            size=size,
            state=SUCCESS,
            action=str(outcome.get("action")),
            bytes_sent=int(outcome.get("bytes_sent", 0)),
            bytes_resumed=int(outcome.get("bytes_resumed", 0)),
        )
    status = str(meta["status"]) if meta else PENDING
    if status == FAILURE:
        return ledger.LayerEnd(digest, size, FAILURE, error=_error(meta))
    if status == SUCCESS:
        return ledger.LayerEnd(digest, size, SUCCESS)
    if status in (PENDING, RETRY, REVOKED):
        # Never started, or waiting to try again: the failed export revoked it (a layer that
        # starts anyway finds the export cancelled and stops before copying).
        return ledger.LayerEnd(digest, size, REVOKED)
    return ledger.LayerEnd(digest, size, "STARTED")  # running: its end adds a late line


def _error(meta: dict[str, Any] | None) -> str:
    text = str((meta or {}).get("result") or "failed")
    if "raised ExportFailed(" in text:  # a chord-wrapped layer error
        text = text.split("raised ExportFailed(", 1)[1].rstrip(")").strip("'\"")
    return text


def sweep(backend: Any, export_id: str, layer_ids: list[str], seconds: int) -> None:
    """Give what the export kept per layer ``seconds`` to live (one pipelined round trip).

    The layers' results, the chord body's and the chord's counting keys, the outcome
    records, the plan and the dispatch marker: the ledger says all of it in a line a layer.
    """
    group = ledger.derived_id(export_id, "layers")
    keys = [backend.get_key_for_task(tid) for tid in layer_ids]
    keys.append(backend.get_key_for_task(ledger.derived_id(export_id, "finalize")))
    keys += [backend.get_key_for_group(group, suffix) for suffix in _CHORD_SUFFIXES]
    keys += [state.outcomes_key(export_id), state.plan_key(export_id), dispatched_key(export_id)]
    try:
        with backend.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.expire(key, seconds)
            pipe.execute()
    except Exception as exc:  # they then expire with CACHESHIP_RESULT_EXPIRES
        logger.warning("export %s: layer results not shortened: %s", export_id, exc)


#: The Redis result backend's keys for a chord's header group (its parts, count, size...).
_CHORD_SUFFIXES = ("", ".j", ".t", ".s", ".d", ".c")


def _late(task: Any, args: Any, kwargs: Any) -> tuple[str, dict[str, Any] | None] | None:
    """(export id, layer) of a cacheship copy_layer or finalize task, else None."""
    name = getattr(task, "name", None)
    args = list(args or [])
    kwargs = dict(kwargs or {})
    if name == COPY_LAYER and len(args) >= 4:
        return str(args[0]), dict(args[3])
    if name == FINALIZE:
        export_id = kwargs.get("export_id", args[1] if len(args) > 1 else None)
        return (str(export_id), None) if export_id else None
    return None


def _ended(backend: Any, export_id: str) -> bool:
    return bool(backend.client.exists(finished_key(export_id)))


def _late_end(layer: dict[str, Any], state: str, retval: Any) -> ledger.LayerEnd:
    outcome = retval if isinstance(retval, dict) else {}
    return ledger.LayerEnd(
        digest=str(layer["digest"]),
        size=int(layer["size"]),
        state=state,
        action=outcome.get("action"),
        bytes_sent=int(outcome.get("bytes_sent", 0)),
        bytes_resumed=int(outcome.get("bytes_resumed", 0)),
        error=None if state == SUCCESS else str(retval),
    )


# Appends a line to the late ledger (KEYS[2]) when the ledger (KEYS[1]) exists and, with
# ARGV[4] = "1", only when it holds ARGV[3] (the layer's "still running" line start).
_ADD_LATE = """
local body = redis.call('GET', KEYS[1])
if not body then return 0 end
if ARGV[4] == '1' and not string.find(body, ARGV[3], 1, true) then return 0 end
redis.call('APPEND', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""


def _add_late(
    backend: Any, export_id: str, end: ledger.LayerEnd, ttl: int, only_if_running: bool = False
) -> None:
    """One round trip; a ledger never written (or expired) gets no headless late lines."""
    backend.client.eval(
        _ADD_LATE,
        2,
        ledger.ledger_key(export_id),
        ledger.late_key(export_id),
        ledger.line(end),
        ttl,
        ledger.running_mark(end.digest),
        "1" if only_if_running else "0",
    )


@task_postrun.connect
def _after_task(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    kwargs: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    """A layer or the chord's body stored its state after its export ended: keep it short."""
    found = _late(task, args, kwargs)
    if found is None or state == RETRY or not task_id:
        return
    export_id, layer = found
    try:
        backend: Any = task.backend
        if not _ended(backend, export_id):
            return
        settings = get_settings()
        if layer is not None and state in (SUCCESS, FAILURE):
            _add_late(backend, export_id, _late_end(layer, state, retval), settings.result_expires)
        elif layer is not None and state == IGNORED:
            # It found its export cancelled and stopped: said only where the ledger had it
            # running (it started as the export failed), not again for every revoked layer.
            end = ledger.LayerEnd(str(layer["digest"]), int(layer["size"]), REVOKED)
            _add_late(backend, export_id, end, settings.result_expires, only_if_running=True)
        own = [task_id] if layer is not None else []
        sweep(backend, export_id, own, settings.layer_results_expires)
    except Exception as exc:  # it then expires with CACHESHIP_RESULT_EXPIRES
        logger.warning("task %s: not shortened after its export ended: %s", task_id, exc)


@task_revoked.connect
def _revoked_after_end(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A layer dropped as revoked (its export failed) was stored REVOKED: keep it short.

    The ledger already says so, unless the layer was running at the end (then retried).
    """
    task_id = getattr(request, "id", None)
    found = _late(sender, getattr(request, "args", None), getattr(request, "kwargs", None))
    if found is None or not task_id or sender is None:
        return
    export_id, layer = found
    try:
        if not _ended(sender.backend, export_id):
            return
        settings = get_settings()
        if layer is not None:  # e.g. running when its export failed, then retrying
            end = ledger.LayerEnd(str(layer["digest"]), int(layer["size"]), REVOKED)
            _add_late(sender.backend, export_id, end, settings.result_expires, True)
        own = [task_id] if layer is not None else []
        sweep(sender.backend, export_id, own, settings.layer_results_expires)
    except Exception as exc:
        logger.warning("task %s: not shortened after its export ended: %s", task_id, exc)
