"""The ``finalize`` task (the chord's body): config blob, manifest blob, then the names.

It runs once every layer task has returned. Names are written last and only after every
layer they reference is known to be stored, so no name ever points at a missing blob.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from celery import Task, shared_task

from tasks import watchdog
from tasks.backends.target import IncompleteCacheError, NameWrite, NameWriteError, Target
from tasks.cacheformat import Descriptor
from tasks.fleet import inflight, state
from tasks.jobs.common import (
    PATIENT,
    ExportFailed,
    finish_export,
    open_target,
    redis_of,
    retry_or_fail,
    settings,
    waits_out_redis,
)
from tasks.plan import ExportPlan
from tasks.progress import PROGRESS, now_iso
from tasks.request import (
    LocalTargetSpec,
    RegistrySpec,
    S3Spec,
    parse_request,
    target_from_json,
)


@shared_task(bind=True, name="cacheship.finalize", **PATIENT)
@waits_out_redis
def finalize(self: Task[Any, Any], results: list[dict[str, Any]], export_id: str) -> dict[str, Any]:
    config = settings()
    redis = redis_of(self)
    try:
        stored = state.load_plan(redis, export_id)
    except LookupError as exc:
        _fail(self, export_id, str(exc))
    plan = ExportPlan.from_json(stored["plan"])
    target = target_from_json(stored["target"])
    steps: list[dict[str, Any]] = stored["steps"]
    def pull(digests: list[str]) -> None:
        """A merge keeps these stored blobs: registered like the export's own, before the
        merge looks at them, so that a prune leaves them alone (docs/prune.md)."""
        if isinstance(target, S3Spec):
            inflight.register(
                redis, inflight.scope_of(target), export_id, digests, ttl=config.result_expires
            )

    # Waiting happens only for a name another export is merging into (merge=true).
    source = stored.get("source")
    store = open_target(
        target,
        config,
        redis,
        on_wait=lambda: publish("writing", "waiting for another merge"),
        on_pull=pull,
        # A registry target mounts the config from a source on the same registry.
        source=parse_request({"source": source, "target": stored["target"]}).source
        if source
        else None,
    )
    base = {
        "export_id": export_id,
        "layers": len(plan.layers),
        "bytes_total": plan.bytes_total,
        "steps": steps,
    }

    merged: list[dict[str, Any]] = []  # one entry per name merged into (merge=true)

    def publish(phase: str, current: str) -> None:
        meta = {**base, "phase": phase, "current": current}
        if merged:
            meta["merged"] = merged
        # The export's own id carries the progress callers follow; this task's too.
        self.backend.store_result(export_id, meta, PROGRESS)
        self.update_state(state=PROGRESS, meta={"export_id": export_id, "phase": phase,
                                                "current": current})
        watchdog.touch(redis, export_id)

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
        # Only layers without a recorded outcome (the store confirmed those) are checked again.
        unconfirmed = [d for d in plan.layers if d.digest not in outcomes]
        if isinstance(target, S3Spec) and inflight.deleted_since_registered(
            redis, inflight.scope_of(target), export_id
        ):
            # A prune deleted meanwhile: trust the bucket, not what the layer tasks saw.
            unconfirmed = list(plan.layers)
        missing = store.missing(unconfirmed)
        if missing:
            raise IncompleteCacheError(f"layers missing from the bucket: {', '.join(missing[:5])}")
        # Config and manifest go up together: on a store 20 ms away one round trip, not two.
        # Progress names the config step until both are stored (never a step as done early).
        publish("writing", steps[-2]["name"])
        _put_blobs(store, [(plan.config_desc, plan.config), (plan.manifest_desc, plan.manifest)])
        merges = isinstance(target, S3Spec | RegistrySpec) and target.merges
        publish("writing", "merging names" if merges else "writing names")
        writes = store.write_names(plan, on_name=lambda write: _merged(write, merged, publish))
        keys = [write.key for write in writes]
    except (IncompleteCacheError, NameWriteError) as exc:
        _fail(self, export_id, str(exc))
    except Exception as exc:
        try:
            retry_or_fail(self, exc, "finalize", config)
        except ExportFailed as failed:
            _fail(self, export_id, str(failed))

    outcomes = state.load_outcomes(redis, export_id)
    counts = {"uploaded": 0, "skipped": 0, "touched": 0, "mounted": 0}
    for item in outcomes.values():
        counts[item["action"]] = counts.get(item["action"], 0) + 1
    result = {
        "status": "complete",
        "export_id": export_id,
        "cache.manifest": plan.manifest_desc.to_json(),
        "config": plan.config_desc.digest,
        **_where(target),
        "names": keys,
        **({"merged": merged} if merged else {}),
        "layers": len(plan.layers),
        "layers_uploaded": counts["uploaded"],
        "layers_skipped": counts["skipped"],
        "layers_touched": counts["touched"],
        # Registries only: linked from the source repository, no bytes copied.
        **({"layers_mounted": counts["mounted"]} if counts["mounted"] else {}),
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


def _where(target: S3Spec | LocalTargetSpec | RegistrySpec) -> dict[str, str]:
    """The result's field naming the destination: bucket, dest or ref."""
    if isinstance(target, S3Spec):
        return {"bucket": target.bucket}
    if isinstance(target, RegistrySpec):
        return {"ref": str(target.reference)}
    return {"dest": target.dest}


def _put_blobs(store: Target, blobs: list[tuple[Descriptor, bytes]]) -> None:
    """Store the small blobs at once; the first failure is raised once all have ended."""
    with ThreadPoolExecutor(max_workers=len(blobs)) as pool:
        for done in [pool.submit(store.put_blob, desc, data) for desc, data in blobs]:
            done.result()


def _merged(
    write: NameWrite, merged: list[dict[str, Any]], publish: Callable[[str, str], None]
) -> None:
    """Say that a name was merged into, with its records before and after."""
    if write.counts is None:
        return
    merged.append(write.to_json())
    c = write.counts
    publish(
        "writing",
        f"merged name {write.name}: {c.records_existing} stored + {c.records_new} new records "
        f"-> {c.records_after}",
    )


def _fail(task: Task[Any, Any], export_id: str, message: str) -> NoReturn:
    finish_export(task, export_id, None, message)
    raise ExportFailed(message) from None


__all__ = ["finalize"]
