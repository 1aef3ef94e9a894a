"""The ``export`` task: validate, read and plan, then hand the copying to a chord.

The chord is ``group(copy_layer × N) | finalize``. Every id in it is derived from the export's
id, so a redelivered ``export`` (its worker died after dispatching) recreates the same ids and
changes nothing; it dispatches only once anyway.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from celery import Task, chord, group, shared_task
from celery.exceptions import Ignore

from tasks import metrics, watchdog
from tasks.backends.local import source as local_source
from tasks.backends.registry.errors import too_large
from tasks.cacheformat import EmptyCacheError
from tasks.fleet import inflight, state
from tasks.jobs.common import (
    PATIENT,
    PERMANENT,
    ExportFailed,
    announce_skipped,
    check_allowed,
    load_source,
    logger,
    mark_started,
    open_target,
    record_skipped,
    redis_of,
    retry_or_fail,
    settings,
    waits_out_redis,
)
from tasks.jobs.copy_layer import copy_layer, layer_title
from tasks.jobs.finalize import finalize
from tasks.plan import ExportPlan, plan_export
from tasks.progress import PROGRESS, config_step, layer_step, manifest_step, now_iso
from tasks.request import (
    LocalSpec,
    LocalTargetSpec,
    RegistrySpec,
    RequestError,
    S3Spec,
    parse_request,
)

#: HEADs in flight while looking for layers already stored (BuildKit-like, quick on S3).
SKIP_CHECK_PARALLELISM = 16


def derived_id(export_id: str, what: str) -> str:
    """A stable id for one part of the export (a layer's digest, "finalize")."""
    return str(uuid.uuid5(uuid.UUID(export_id), what))


def _steps(plan: ExportPlan, export_id: str, image_manifest: bool) -> list[dict[str, Any]]:
    steps = [
        {
            "name": layer_step(d.digest),
            "task_id": derived_id(export_id, d.digest),
            "kind": "layer",
            "digest": d.digest,
            "size": d.size,
        }
        for d in plan.layers
    ]
    for kind, desc, name in (
        ("config", plan.config_desc, config_step(plan.config_desc.digest)),
        ("manifest", plan.manifest_desc, manifest_step(plan.manifest_desc.digest, image_manifest)),
    ):
        steps.append(
            {"name": name, "task_id": export_id, "kind": kind, "digest": desc.digest,
             "size": desc.size}
        )
    return steps


def describe(target: S3Spec | LocalTargetSpec | RegistrySpec) -> str:
    """How a person names the destination: ``s3://bucket/prefix main;other``, ``DIR:tag``,
    ``host/repository:tag``."""
    if isinstance(target, LocalTargetSpec):
        return f"{target.dest}:{target.tag}"
    if isinstance(target, RegistrySpec):
        return str(target.reference)
    return f"s3://{target.bucket}/{target.prefix} {';'.join(target.name)}"


@shared_task(bind=True, name="cacheship.export", **PATIENT)
@waits_out_redis
def export(self: Task[Any, Any], request: dict[str, Any]) -> dict[str, Any]:
    config = settings()
    export_id = str(self.request.id)
    redis = redis_of(self)
    if redis.exists(f"cacheship-finished-{export_id}"):
        raise Ignore()  # delivered again after it ended (a lost worker): its state stays
    began = time.monotonic()
    # Results keep a task's args (result_extended): never the raw request, which may hold
    # what validation refuses (credentials); the validated request replaces it.
    self.request.args = []
    try:
        req = parse_request(request)
        self.request.args = [req.model_dump(mode="json", by_alias=True)]
        if isinstance(req.target, S3Spec | RegistrySpec):
            check_allowed(req.target, config, "target")
        else:
            open_target(req.target, config, redis)  # dest under CACHESHIP_DEST_ROOTS?
        if isinstance(req.source, S3Spec | RegistrySpec):
            check_allowed(req.source, config, "source", "read")
        self.update_state(state=PROGRESS, meta={"export_id": export_id, "phase": "reading",
                                                "started_at": now_iso()})
        plan = plan_export(load_source(req.source, config), req.target)
        if isinstance(req.target, RegistrySpec) and not req.target.merges:
            # BuildKit's importer would refuse it: refused before a byte is copied.
            for what, desc in (("config", plan.config_desc), ("manifest", plan.manifest_desc)):
                if (message := too_large(what, desc)) is not None:
                    raise RequestError(f"target.ref: {message}")
        if isinstance(req.source, LocalSpec):
            # A missing or wrong-sized layer file fails the export before any upload.
            local_source.check_blobs(req.source, config.source_roots, plan.layers)
    except EmptyCacheError as exc:
        metrics.export_finished("empty", time.monotonic() - began)
        return {"status": "empty", "message": str(exc), "layers": 0, "bytes_sent": 0}
    except PERMANENT as exc:
        metrics.export_finished("failure", time.monotonic() - began)
        raise ExportFailed(str(exc)) from None
    except Exception as exc:
        # Reading an S3 source meets the same transient faults as copying a layer.
        try:
            retry_or_fail(self, exc, "reading the source", config, args=(request,))
        except ExportFailed:
            metrics.export_finished("failure", time.monotonic() - began)
            raise

    for warning in plan.warnings:
        logger.warning("export %s: %s", export_id, warning)
    mark_started(redis, export_id, config.result_expires)
    steps = _steps(plan, export_id, req.target.image_manifest)
    plan_json = plan.to_json()
    source = req.source.model_dump(mode="json", by_alias=True)
    target = req.target.model_dump(mode="json", by_alias=True)
    # The source too: the watchdog sends a lost layer's copy again from the plan alone.
    state.save_plan(
        redis,
        export_id,
        {"plan": plan_json, "steps": steps, "target": target, "source": source},
        config.result_expires,
    )
    if not redis.exists(f"cacheship-finished-{export_id}"):
        watchdog.touch(redis, export_id, start=True)  # watched from now on, until it ends
    meta = {
        "export_id": export_id,
        "phase": "copying",
        "layers": len(plan.layers),
        "bytes_total": plan.bytes_total,
        "steps": steps,
        "started_at": now_iso(),
        "target": describe(req.target),
    }
    self.update_state(state=PROGRESS, meta=meta)
    # Before any layer task looks at the bucket: a prune now leaves these blobs alone, and
    # one deleting right now finishes its batch first (docs/prune.md). A redelivery after
    # the export ended registers nothing (nobody would release it). Prune collects S3 only.
    if isinstance(req.target, S3Spec) and not redis.exists(f"cacheship-finished-{export_id}"):
        digests = [d.digest for d in plan.layers]
        digests += [plan.config_desc.digest, plan.manifest_desc.digest]
        scope = inflight.scope_of(req.target)
        inflight.register(redis, scope, export_id, digests, ttl=config.result_expires)
    # BuildKit's exporter HEADs each blob and skips those stored: so does this, for all
    # layers at once, before any task is sent. A layer already stored as it is costs a HEAD
    # and one pipelined write here instead of a task's broker round trips, states and
    # events; every other layer gets its task. What the first delivery found is kept with
    # the dispatch marker: a delivery after a lost worker (which may have died half-way
    # through publishing) sends the very same chord again, under the same ids. Tasks that
    # already ran are discarded by the workers (successful ones are deduplicated) and the
    # chord counts each header task once, by its id.
    marker = f"cacheship-dispatched-{export_id}"
    known = redis.get(marker)
    first = known is None
    if first:
        found = open_target(req.target, config, redis).survey(
            plan.layers, parallelism=SKIP_CHECK_PARALLELISM
        )
        stored_digests = sorted(digest for digest, present in found.items() if present)
        # The token tells our own write, read back after a retried SET NX, from another's.
        mine = json.dumps({"stored": stored_digests, "by": uuid.uuid4().hex})
        first = bool(redis.set(marker, mine, nx=True, ex=config.result_expires))
        if not first:
            known = redis.get(marker)
            first = (known.decode() if isinstance(known, bytes) else known) == mine
    if not first:
        found = {digest: True for digest in _stored_at_dispatch(known)}
    layer_ids = [step["task_id"] for step in steps[: len(plan.layers)]]
    if first:
        stored = [
            (d.digest, d.size, tid)
            for d, tid in zip(plan.layers, layer_ids, strict=True)
            if found.get(d.digest)
        ]
        record_skipped(self, export_id, stored, config.result_expires)
        announce_skipped(
            self, [(digest, size, tid, layer_title(digest, size)) for digest, size, tid in stored]
        )
        for _, size, _ in stored:
            metrics.layer_finished("skipped", 0, size, 0.0)
        metrics.export_started()
    header = [
        copy_layer.s(
            export_id, source, target, layer, absent=first and found.get(layer["digest"]) is False
        ).set(task_id=tid, shadow=layer_title(layer["digest"], layer["size"]))
        for layer, tid in zip(plan_json["layers"], layer_ids, strict=True)
        if not found.get(layer["digest"])
    ]
    body = finalize.s(export_id).set(
        task_id=derived_id(export_id, "finalize"),
        shadow=f"finalize {describe(req.target)}",
    )
    if header:
        layers = group(header).set(task_id=derived_id(export_id, "layers"))
        chord(layers, body).apply_async()
    else:
        body.apply_async(([],))  # every layer is stored: straight to the names
    # The export stays PROGRESS: the chord's tasks write its final state (common.py).
    raise Ignore()


def _stored_at_dispatch(raw: Any) -> list[str]:
    """The digests the first delivery found stored (its dispatch marker's value)."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return []
    if isinstance(value, dict):
        value = value.get("stored")
    return [str(d) for d in value] if isinstance(value, list) else []


__all__ = ["derived_id", "export"]
