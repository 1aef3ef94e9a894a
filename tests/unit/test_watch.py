"""The live view's logic without a terminal: what a frame holds, phases, speeds, refusals."""

from __future__ import annotations

import logging
import sys
import time

from worker.cli.watch import MAX_ROWS, Tracker, aggregate_line, screen, screen_rows
from worker.client import Snapshot, StepStatus
from worker.refusals import RefusalFilter

EXPORT_ID = "0b7c4f8e-2a61-4d0f-9a7e-5f4a3c2b1d00"
KiB = 1024
MiB = 1024 * KiB


def digest(i: int) -> str:
    return f"sha256:{i:064x}"


def layer(
    i: int,
    state: str = "PENDING",
    status: str = "waiting",
    done: int = 0,
    size: int = 64 * KiB,
    error: str | None = None,
) -> StepStatus:
    name = f"writing layer {digest(i)}"
    return StepStatus(name, f"t{i}", "layer", digest(i), size, state, status, done, error)


def documents(state: str = "PENDING", status: str = "waiting") -> list[StepStatus]:
    config, manifest = "sha256:" + "c" * 64, "sha256:" + "d" * 64
    return [
        StepStatus(f"writing config {config}", EXPORT_ID, "config", config, 900, state, status),
        StepStatus(
            f"writing cache manifest {manifest}", EXPORT_ID, "manifest", manifest, 700
        ),
    ]


def snap(steps: list[StepStatus], state: str = "PROGRESS", phase: str = "copying") -> Snapshot:
    return Snapshot(EXPORT_ID, state, phase, steps)


def text(lines: list[object]) -> list[str]:
    return [str(line) for line in lines]


def test_a_frame_of_600_layers_fits_and_counts_every_layer() -> None:
    tracker = Tracker(EXPORT_ID)
    # 0-299 done (every 10th skipped), 300-303 running, 5 failed early, the rest queued
    for t in range(4):
        steps = []
        for i in range(600):
            if i == 5:
                steps.append(layer(i, "FAILURE", "failed", error="content does not match"))
            elif i < 100 * (t + 1) - 1:
                steps.append(layer(i, "SUCCESS", "skipped" if i % 10 == 0 else "uploaded"))
            elif i < 100 * (t + 1) + 3:
                steps.append(layer(i, "PROGRESS", "copying", 30 * KiB))
            else:
                steps.append(layer(i))
        tracker.update(snap(steps + documents()), float(t))
    lines = text(screen(tracker, 120, 50))
    assert len(lines) <= 49
    assert all(len(line) <= 120 for line in lines)
    assert lines[0].startswith("export 0b7c4f8e  copying layers: 398/600 done")
    assert lines[1].startswith("layers ")
    assert " 398/600  358 uploaded, 40 skipped, 4 running, 1 failed" in lines[1]
    assert lines[2].startswith("bytes  ") and "/ 37.5 MiB" in lines[2]
    rows = [line for line in lines if line.startswith("  writing layer ")]
    assert len(rows) == MAX_ROWS
    # the failure first, then the running layers, then those finished last
    assert digest(5)[:19] in rows[0] and "failed" in rows[0]
    assert all("copying" in row for row in rows[1:5])
    assert all("uploaded" in row or "skipped" in row for row in rows[5:])
    [rest] = [line for line in lines if line.startswith("  … ")]
    assert rest == "  … 588 more layers: 197 queued, 391 done"
    assert lines[-2].startswith("  writing config ") and lines[-2].endswith("queued")
    assert lines[-1].startswith("  writing cache manifest ")


def test_short_screens_and_many_failures_keep_failures_first() -> None:
    tracker = Tracker(EXPORT_ID)
    steps = [
        layer(i, "FAILURE", "failed", error="boom") if i < 20 else layer(i, "SUCCESS")
        for i in range(300)
    ]
    tracker.update(snap(steps + documents()), 0.0)
    lines = text(screen(tracker, 100, 16))
    assert len(lines) <= 15
    rows = [line for line in lines if line.startswith("  writing layer ")]
    assert len(rows) == screen_rows(16) - 1
    assert all("failed" in row for row in rows)
    assert any(line.startswith(f"  … {20 - len(rows)} more failed layers: ") for line in lines)
    assert f"cacheship status {EXPORT_ID}" in "\n".join(lines)


def test_layers_revoked_after_a_failure_are_cancelled_not_failed() -> None:
    tracker = Tracker(EXPORT_ID)
    steps = [layer(0, "SUCCESS", "uploaded"), layer(1, "FAILURE", "failed", error="boom")]
    steps += [layer(i, "REVOKED") for i in range(2, 200)]
    tracker.update(snap(steps + documents(), state="FAILURE", phase="failed"), 0.0)
    lines = text(screen(tracker, 120, 30))
    assert "1/200  1 uploaded, 0 skipped, 1 failed, 198 cancelled" in lines[1], lines
    rows = [line for line in lines if line.startswith("  writing layer ")]
    assert [row for row in rows if "failed" in row] == [rows[0]]
    assert digest(1)[:19] in rows[0]
    [rest] = [line for line in lines if line.startswith("  … ")]
    assert rest == "  … 198 more layers: 198 cancelled", rest
    assert tracker.phase() == "failed"


def test_phases_read_right_from_the_first_poll() -> None:
    def headline(*snaps: Snapshot) -> str:
        tracker = Tracker(EXPORT_ID)
        for i, s in enumerate(snaps):
            tracker.update(s, float(i))
        return tracker.headline()

    running = [layer(0, "PROGRESS", "copying", 1), layer(1)]
    done = [layer(0, "SUCCESS", "uploaded"), layer(1, "SUCCESS", "skipped")]
    assert headline(Snapshot(EXPORT_ID, "PENDING")) == "queued: waiting for a worker"
    assert headline(Snapshot(EXPORT_ID, "STARTED")) == "reading the source cache"
    assert headline(snap(running + documents())) == "copying layers: 0/2 done"
    assert headline(snap(done + documents(), phase="verifying")) == (
        "verifying: every layer is in the bucket"
    )
    writing = snap(done + documents("PROGRESS", "writing"), phase="writing")
    assert headline(writing) == "writing config"
    assert headline(snap(done + documents(), state="SUCCESS", phase="")) == "complete"
    assert headline(snap(running + documents(), state="FAILURE", phase="")) == "failed"


def test_speed_falls_while_nothing_moves_and_stalled_layers_say_why() -> None:
    tracker = Tracker(EXPORT_ID)
    big = 240 * MiB
    for t, done in ((0.0, 0), (1.0, 60 * MiB), (2.0, 120 * MiB), (3.0, 232 * MiB)):
        tracker.update(snap([layer(0, "PROGRESS", "copying", done, size=big)]), t)
    moving = tracker.speed()
    assert moving is not None and moving > 70 * MiB
    view = tracker.steps[f"writing layer {digest(0)}"]
    assert view.short_mark(3.5) == "copying"
    for t in (4.0, 5.0, 6.0, 7.0, 8.0):
        tracker.update(snap([layer(0, "PROGRESS", "copying", 232 * MiB, size=big)]), t)
    stalled = tracker.speed()
    assert stalled is not None and stalled < moving / 2
    assert view.short_mark(8.0) == "waiting on S3"
    tracker.update(snap([layer(0, "PROGRESS", "completing", big, size=big)]), 9.0)
    assert view.short_mark(9.0) == "completing upload"
    assert "ETA" in aggregate_line(tracker) or tracker.eta() is None


def test_elapsed_counts_from_the_submission_when_redis_knows_it() -> None:
    tracker = Tracker(EXPORT_ID)
    tracker.update(Snapshot(EXPORT_ID, "PROGRESS", submitted_at=time.time() - 125), 0.0)
    assert 124 <= tracker.elapsed() < 200
    assert "2:0" in text(screen(tracker, 100, 30))[0]
    fresh = Tracker(EXPORT_ID)
    fresh.update(Snapshot(EXPORT_ID, "PROGRESS"), 10.0)
    fresh.update(Snapshot(EXPORT_ID, "PROGRESS"), 13.0)
    assert fresh.elapsed() == 3.0


# --- refusals in the worker's log -----------------------------------------------------------


class ExportFailed(Exception):
    """Named as the tasks' refusal (the filter matches by name, never imports tasks)."""


class ChordError(Exception):
    pass


def record(exc: BaseException, logger: str = "celery.app.trace") -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    message = "Task %(name)s raised unexpected: %(exc)r"
    rec = logging.LogRecord(logger, logging.ERROR, __file__, 1, message, ({"name": "x"},), info)
    rec.data = {"name": "cacheship.copy_layer", "id": "abc"}
    return rec


def test_a_refusal_becomes_one_warning_line() -> None:
    rec = record(ExportFailed("writing layer sha256:ab: content does not match its digest"))
    assert RefusalFilter().filter(rec)
    assert rec.levelno == logging.WARNING and rec.levelname == "WARNING"
    assert rec.exc_info is None
    assert rec.getMessage() == (
        "cacheship.copy_layer[abc] refused: writing layer sha256:ab: content does not match "
        "its digest"
    )


def test_a_chord_carrying_a_refusal_is_unwrapped() -> None:
    rec = record(
        ChordError("Dependency 1f raised ExportFailed('writing layer sha256:ab: missing')"),
        "celery.backends.redis",
    )
    del rec.data
    RefusalFilter().filter(rec)
    assert rec.levelno == logging.WARNING
    assert rec.getMessage() == "chord refused: writing layer sha256:ab: missing"


def test_a_bug_behind_a_refusal_keeps_its_traceback_and_errors_stay_errors() -> None:
    try:
        try:
            {}["plan"]
        except KeyError:
            raise ExportFailed("finalize: KeyError: 'plan'") from None
    except ExportFailed as exc:
        rec = record(exc)
    RefusalFilter().filter(rec)
    assert rec.levelno == logging.ERROR
    assert rec.exc_info is not None and rec.exc_info[0] is KeyError
    other = record(RuntimeError("boom"))
    RefusalFilter().filter(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None


def test_how_long_an_export_took_does_not_depend_on_who_watched() -> None:
    from worker.cli.report import took

    result = {"completed_at": "2026-01-01T10:00:42.500Z"}
    submitted = 1767261600.0  # 2026-01-01T10:00:00Z
    done = Snapshot(EXPORT_ID, "SUCCESS", result=result, submitted_at=submitted)
    assert took(done, fallback=3.0) == 42.5
    assert took(Snapshot(EXPORT_ID, "SUCCESS", result=result), fallback=3.0) == 3.0
