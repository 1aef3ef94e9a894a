"""The ``finalize`` task (the chord's body): config blob, manifest blob, then the names.

It runs once every layer task has returned. Names are written last and only after every
layer they reference is known to be stored, so no name ever points at a missing blob.
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery import Task, shared_task

from tasks import state
from tasks.jobs.common import (
    ExportFailed,
    finish_export,
    open_target,
    redis_of,
    retry_or_fail,
    settings,
)
from tasks.plan import ExportPlan
from tasks.progress import PROGRESS, now_iso
from tasks.publish import IncompleteCacheError
from tasks.request import S3Spec


@shared_task(bind=True, name="cacheship.finalize", max_retries=None)
def finalize(self: Task[Any, Any], results: list[dict[str, Any]], export_id: str) -> dict[str, Any]:
    config = settings()
    redis = redis_of(self)
    try:
        stored = state.load_plan(redis, export_id)
    except LookupError as exc:
        _fail(self, export_id, str(exc))
    plan = ExportPlan.from_json(stored["plan"])
    target = S3Spec.model_validate(stored["target"])
    steps: list[dict[str, Any]] = stored["steps"]
    store = open_target(target, config, redis)
    base = {
        "export_id": export_id,
        "layers": len(plan.layers),
        "bytes_total": plan.bytes_total,
        "steps": steps,
    }

    def publish(phase: str, current: str) -> None:
        meta = {**base, "phase": phase, "current": current}
        # The export's own id carries the progress callers follow; this task's too.
        self.backend.store_result(export_id, meta, PROGRESS)
        self.update_state(state=PROGRESS, meta={"export_id": export_id, "phase": phase,
                                                "current": current})

    try:
        # A recorded outcome was written after the store itself confirmed the blob (upload
        # completed, or HEAD found it with its size) during this export: only the others
        # are checked again. Layers the export found stored sent no task: their record
        # accounts for them.
        outcomes = state.load_outcomes(redis, export_id)
        reported = {r["digest"] for r in results} | set(outcomes)
        unaccounted = [d.digest for d in plan.layers if d.digest not in reported]
        if unaccounted:
            raise IncompleteCacheError(f"layers not copied: {', '.join(unaccounted[:5])}")
        publish("verifying", "checking every layer is stored")
        missing = store.missing([d for d in plan.layers if d.digest not in outcomes])
        if missing:
            raise IncompleteCacheError(f"layers missing from the bucket: {', '.join(missing[:5])}")
        publish("writing", steps[-2]["name"])
        store.put_blob(plan.config_desc, plan.config)
        publish("writing", steps[-1]["name"])
        store.put_blob(plan.manifest_desc, plan.manifest)
        publish("writing", "writing names")
        keys = store.write_names(plan)
    except IncompleteCacheError as exc:
        _fail(self, export_id, str(exc))
    except Exception as exc:
        try:
            retry_or_fail(self, exc, "finalize", config)
        except ExportFailed as failed:
            _fail(self, export_id, str(failed))

    outcomes = state.load_outcomes(redis, export_id)
    counts = {"uploaded": 0, "skipped": 0, "touched": 0}
    for item in outcomes.values():
        counts[item["action"]] = counts.get(item["action"], 0) + 1
    result = {
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
    finish_export(self, export_id, result, None)
    # The plan (megabytes for thousands of layers) is dead once the names are written; the
    # result carries everything a caller reads.
    state.drop_plan(redis, export_id)
    return {"export_id": export_id, "status": "complete", "names": keys}


def _fail(task: Task[Any, Any], export_id: str, message: str) -> NoReturn:
    finish_export(task, export_id, None, message)
    raise ExportFailed(message) from None


__all__ = ["finalize"]
