"""Texts and JSON documents about an export: the summary, the status table, ``--json``."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime
from typing import Any

from worker.cli.common import human_bytes
from worker.client import Snapshot, StepStatus

STATE_WORDS = {
    "PENDING": "queued: no worker has taken it yet (or no export has this id)",
    "RECEIVED": "received by a worker",
    "STARTED": "started",
    "PROGRESS": "running",
    "RETRY": "retrying",
    "SUCCESS": "finished",
    "FAILURE": "failed",
    "REVOKED": "revoked",
}


def failed(snap: Snapshot) -> bool:
    return snap.state in ("FAILURE", "REVOKED", "LOST")


def error_line(snap: Snapshot) -> str:
    if snap.state == "LOST":
        return snap.error or f"Redis has no record of export {snap.export_id}"
    return f"export {snap.export_id} failed: {snap.error or snap.state.lower()}"


def ignored_error_line(snap: Snapshot) -> str:
    """A failure the target's ``ignore-error=true`` turns into a warning (as buildx does)."""
    return f"warning: {error_line(snap)} (ignored: the target has ignore-error=true)"


def took(snap: Snapshot, fallback: float | None = None) -> float | None:
    """Seconds from enqueue to completion (or to now), the same whoever watches and when.

    ``fallback`` (seconds this process watched) is used only when Redis no longer has the
    submission time.
    """
    if snap.submitted_at is None:
        return fallback
    end = time.time()
    completed = (snap.result or {}).get("completed_at")
    if isinstance(completed, str):
        with contextlib.suppress(ValueError):
            end = datetime.fromisoformat(completed.replace("Z", "+00:00")).timestamp()
    return max(end - snap.submitted_at, 0.0)


def step_json(step: StepStatus) -> dict[str, Any]:
    return {
        "name": step.name,
        "kind": step.kind,
        "digest": step.digest,
        "size": step.size,
        "task_id": step.task_id,
        "state": step.state,
        "status": step.status,
        "bytes_done": step.bytes_done,
        "error": step.error,
        "worker": step.worker,
        "worker_lost_seconds": round(step.lost_worker[1], 1) if step.lost_worker else None,
    }


def status_json(snap: Snapshot) -> dict[str, Any]:
    """The document ``cacheship status --json`` prints (shape listed in docs/progress.md)."""
    return {
        "export_id": snap.export_id,
        "state": snap.state,
        "ready": snap.ready,
        "phase": snap.phase,
        "bytes_done": snap.bytes_done,
        "bytes_total": snap.bytes_total,
        "steps": [step_json(s) for s in snap.steps],
        "result": snap.result,
        "error": snap.error,
    }


def failure_json(snap: Snapshot) -> dict[str, Any]:
    """What ``export --wait --json`` prints when the export failed."""
    return {"export_id": snap.export_id, "state": snap.state, "error": snap.error}


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False)


def summary_lines(result: dict[str, Any], elapsed: float | None = None) -> list[str]:
    """A finished export in a few lines: counts, bytes, the manifest and where it landed."""
    export_id = result.get("export_id", "")
    if result.get("status") == "empty":
        return [f"export {export_id}: {result.get('message', 'nothing to export')}".strip()]
    took = f" in {elapsed:.1f}s" if elapsed is not None else ""
    lines = [f"export {export_id}: complete{took}"]
    lines.append(
        f"  layers    {result.get('layers', 0)}: {result.get('layers_uploaded', 0)} uploaded, "
        f"{result.get('layers_skipped', 0)} skipped, {result.get('layers_touched', 0)} touched"
    )
    sent = f"  bytes     {human_bytes(result.get('bytes_sent', 0))} sent of " + human_bytes(
        result.get("bytes_total", 0)
    )
    if result.get("bytes_resumed"):
        sent += f" ({human_bytes(result['bytes_resumed'])} resumed from an earlier try)"
    lines.append(sent)
    manifest = result.get("cache.manifest")
    if manifest:
        try:
            desc = json.loads(manifest)
            lines.append(f"  manifest  {desc['digest']} ({desc['mediaType']}, {desc['size']} B)")
        except (ValueError, KeyError, TypeError):
            lines.append(f"  manifest  {manifest}")
    if result.get("config"):
        lines.append(f"  config    {result['config']}")
    bucket = result.get("bucket", "")
    merged = {m.get("key"): m for m in result.get("merged", []) if isinstance(m, dict)}
    for key in result.get("names", []):
        where = f"s3://{bucket}/{key}" if bucket else key
        lines.append(f"  name      {where}" + _merge_note(merged.get(key)))
    return lines


def _merge_note(merge: dict[str, Any] | None) -> str:
    """`` (merged: 4 stored + 2 new records -> 5, ...)`` for a name written with merge=true."""
    if not merge:
        return ""
    note = (
        f" (merged: {merge.get('records_existing', 0)} stored + {merge.get('records_new', 0)} "
        f"new records -> {merge.get('records_after', 0)}"
    )
    dropped = [
        f"{merge[field]} {what}"
        for field, what in (
            ("results_missing", "results with layers gone"),
            ("results_expired", "expired"),
            ("results_over_limit", "over max_records"),
        )
        if merge.get(field)
    ]
    if dropped:
        note += "; dropped " + ", ".join(dropped)
    if merge.get("replaced_invalid"):
        note += "; replaced an invalid config"
    return note + ")"


def status_lines(snap: Snapshot) -> list[str]:
    """``cacheship status ID``: the state, then every step, then the summary or the error."""
    word = STATE_WORDS.get(snap.state, snap.state.lower())
    head = f"export {snap.export_id}: {snap.state} ({word}"
    if snap.phase and snap.state not in ("SUCCESS", "FAILURE"):
        head += f", {snap.phase}"
    seconds = took(snap)
    if seconds is not None and snap.state != "FAILURE":
        head += f" in {seconds:.1f}s" if snap.ready else f" for {seconds:.0f}s"
    head += ")"
    lines = [head]
    if snap.bytes_total and not snap.ready:
        share = 100 * snap.bytes_done // max(snap.bytes_total, 1)
        lines.append(
            f"  {human_bytes(snap.bytes_done)} of {human_bytes(snap.bytes_total)} "
            f"written ({share}%)"
        )
    for step in snap.steps:
        size = (
            f"{human_bytes(step.bytes_done)} / {human_bytes(step.size)}"
            if step.kind == "layer"
            else human_bytes(step.size)
        )
        extra = f": {step.error}" if step.error else ""
        lines.append(f"  {step.name}  {size}  {step.state} {step.status}{extra}")
    if snap.state == "SUCCESS" and snap.result:
        lines.extend(summary_lines(snap.result)[1:])
    return lines
