"""Progress of every step, as the metadata that tasks publish (format: docs/progress.md).

Step names are BuildKit's own progress items, so what an operator sees in Flower or on the
command line reads like ``docker buildx build`` output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

PROGRESS = "PROGRESS"


def now_iso() -> str:
    """UTC wall-clock time for start and completion stamps."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def layer_step(digest: str) -> str:
    return f"writing layer {digest}"


def config_step(digest: str) -> str:
    return f"writing config {digest}"


def manifest_step(digest: str, image_manifest: bool) -> str:
    kind = "cache image manifest" if image_manifest else "cache manifest"
    return f"writing {kind} {digest}"


class Throttle:
    """Calls ``publish`` at most every ``interval`` seconds, the first time one interval in.

    Progress is one Redis write per call; a layer streamed in 1 MiB chunks would otherwise
    cost a round trip per MiB.
    """

    def __init__(self, publish: Callable[[int], None], interval: float = 0.5) -> None:
        self._publish = publish
        self._interval = interval
        self._last = time.monotonic()

    def __call__(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            self._publish(done)


def step_meta(
    step: str,
    *,
    export_id: str,
    digest: str,
    bytes_done: int,
    bytes_total: int,
    started_at: str,
    status: str,
    completed_at: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One step's metadata: what ``PROGRESS`` (and the final result) carry."""
    return {
        "step": step,
        "export_id": export_id,
        "digest": digest,
        "status": status,
        "bytes_done": bytes_done,
        "bytes_total": bytes_total,
        "started_at": started_at,
        "completed_at": completed_at,
        "error": error,
    }
