"""Prometheus metrics of the copy work: what the task code counts, nothing about serving them.

Task modules call the plain functions below (a line or two per task); the worker process
serves the numbers (``worker/metrics.py``). Celery's prefork pool runs tasks in child
processes, so the worker switches prometheus_client to its multiprocess mode before this
module is imported: every process then writes its values to files the serving process
sums. That is why the objects here live in a registry of their own and nothing here reads
settings or imports Celery: the same calls work in a pool child, in a thread of the threads
pool, and in a unit test.

Label values are fixed sets, created up front so that every series exists (at 0) from the
worker's start: a dashboard's ``rate()`` then sees the first increase, and a scrape shows
every name whether or not anything happened yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Outcome = Literal["success", "failure", "empty"]
LayerAction = Literal["uploaded", "skipped", "touched", "mounted"]

OUTCOMES: tuple[Outcome, ...] = ("success", "failure", "empty")
ACTIONS: tuple[LayerAction, ...] = ("uploaded", "skipped", "touched", "mounted")
# The Celery tasks that retry transient S3/Redis errors (their short names).
RETRYING_TASKS = ("export", "copy_layer", "finalize")

# Exports run from seconds (a warm re-export) to hours (gigabytes of layers).
EXPORT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)
# A layer: a HEAD that finds it (milliseconds) up to a multi-gigabyte upload.
LAYER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

REGISTRY = CollectorRegistry(auto_describe=True)

EXPORTS_STARTED = Counter(
    "cacheship_exports_started",
    "Exports whose plan was made and whose layer copies were handed out.",
    registry=REGISTRY,
)
EXPORTS = Counter(
    "cacheship_exports",
    "Finished exports by outcome: success (names written), failure, empty (no layers).",
    ["outcome"],
    registry=REGISTRY,
)
EXPORT_SECONDS = Histogram(
    "cacheship_export_duration_seconds",
    "From the export task's start to its outcome (success: the names are written).",
    ["outcome"],
    buckets=EXPORT_BUCKETS,
    registry=REGISTRY,
)
LAYERS = Counter(
    "cacheship_layers",
    "Layer copies finished, by what happened: uploaded, skipped (already in the bucket), "
    "touched (already there, refreshed), mounted (linked from another repository of the "
    "same registry).",
    ["action"],
    registry=REGISTRY,
)
UPLOADED_BYTES = Counter(
    "cacheship_layer_uploaded_bytes",
    "Bytes of layer blobs sent to the target bucket.",
    registry=REGISTRY,
)
SKIPPED_BYTES = Counter(
    "cacheship_layer_skipped_bytes",
    "Bytes of layer blobs not sent because the bucket already held them (skipped or touched "
    "layers, and parts resumed from an earlier try).",
    registry=REGISTRY,
)
LAYER_SECONDS = Histogram(
    "cacheship_layer_duration_seconds",
    "Time to copy one layer (HEAD, then upload or touch when needed), by action.",
    ["action"],
    buckets=LAYER_BUCKETS,
    registry=REGISTRY,
)
LAYERS_IN_FLIGHT = Gauge(
    "cacheship_layers_in_flight",
    "Layer copies running now in this worker (all its processes and threads).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
RETRIES = Counter(
    "cacheship_task_retries",
    "Tasks put back for a later retry after a transient S3 or Redis error, by task.",
    ["task"],
    registry=REGISTRY,
)

for _outcome in OUTCOMES:
    EXPORTS.labels(outcome=_outcome)
    EXPORT_SECONDS.labels(outcome=_outcome)
for _action in ACTIONS:
    LAYERS.labels(action=_action)
    LAYER_SECONDS.labels(action=_action)
for _task in RETRYING_TASKS:
    RETRIES.labels(task=_task)


def export_started() -> None:
    """An export planned its copies (called once per export, by the export task)."""
    EXPORTS_STARTED.inc()


def export_finished(outcome: Outcome, seconds: float | None = None) -> None:
    """An export ended; ``seconds`` when its start is known (a failing layer may not know it)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
    EXPORTS.labels(outcome=outcome).inc()
    if seconds is not None:
        EXPORT_SECONDS.labels(outcome=outcome).observe(max(0.0, seconds))


def layer_finished(action: str, bytes_sent: int, size: int, seconds: float) -> None:
    """One layer copied: ``bytes_sent`` went over the wire, the rest of ``size`` did not."""
    if action not in ACTIONS:
        raise ValueError(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
    LAYERS.labels(action=action).inc()
    LAYER_SECONDS.labels(action=action).observe(max(0.0, seconds))
    UPLOADED_BYTES.inc(max(0, bytes_sent))
    SKIPPED_BYTES.inc(max(0, size - bytes_sent))


@contextmanager
def layer_in_flight() -> Iterator[None]:
    """Counts a layer copy as running for as long as the block runs (any thread, any process)."""
    LAYERS_IN_FLIGHT.inc()
    try:
        yield
    finally:
        LAYERS_IN_FLIGHT.dec()


def task_retried(task: str) -> None:
    """A task scheduled a retry of a transient error (``task``: its short name, e.g. copy_layer)."""
    RETRIES.labels(task=task.rsplit(".", 1)[-1]).inc()
