"""Following an export: step tracking, a live rich view for terminals, plain lines for logs.

Steps carry BuildKit's own progress names (``writing layer sha256:...``, ``writing config
sha256:...``, ``writing cache manifest sha256:...``). On a terminal every step gets a bar
(bytes, speed, a mark when it was uploaded, skipped or touched); elsewhere (CI logs, pipes)
one line is printed when a step starts, every few seconds while a big layer copies, and
when it ends, like ``docker buildx build --progress=plain``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as RichTask
from rich.text import Text

from worker.cli.common import human_bytes, short_digest
from worker.client import Snapshot, StepStatus

ACTIONS = frozenset({"uploaded", "skipped", "touched"})
RUNNING = frozenset({"STARTED", "PROGRESS", "RECEIVED"})
QUEUED_HINT_AFTER = 15.0
PLAIN_PROGRESS_EVERY = 10.0

_MARKS = {
    "uploaded": "uploaded",
    "skipped": "skipped: already in the bucket",
    "touched": "touched: already in the bucket, refreshed",
    "done": "done",
}


class Snapshots(Protocol):
    """What a watcher needs from :class:`worker.client.Client`."""

    def snapshot(self, export_id: str, with_steps: bool = True) -> Snapshot: ...


@dataclass
class StepView:
    """One step as the watcher has seen it so far."""

    name: str
    kind: str
    digest: str
    size: int
    state: str = "PENDING"
    status: str = "waiting"
    bytes_done: int = 0
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    last_line: float = 0.0

    @property
    def done(self) -> bool:
        return self.state == "SUCCESS" or (self.state == "PROGRESS" and self.status in ACTIONS)

    @property
    def failed(self) -> bool:
        return self.state == "FAILURE"

    @property
    def running(self) -> bool:
        return not self.done and not self.failed and self.state in RUNNING | {"RETRY"}

    @property
    def action(self) -> str:
        """uploaded / skipped / touched once known, else done."""
        return self.status if self.status in ACTIONS else "done"

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    def short_mark(self) -> str:
        """One word for a progress bar: the error itself is printed once the view ends."""
        if self.failed:
            return "failed"
        if self.done:
            return self.action
        if self.state == "RETRY":
            return "retrying"
        if self.running:
            return "writing" if self.kind != "layer" else self.status
        return "waiting"

    def mark(self) -> str:
        if self.failed:
            return f"failed: {self.error}" if self.error else "failed"
        if self.done:
            return _MARKS[self.action]
        if self.state == "RETRY":
            return f"retrying: {self.error}" if self.error else "retrying"
        if self.running:
            return "writing" if self.kind != "layer" else self.status
        return "waiting"


@dataclass
class Event:
    """A change worth a line in a log: ``start``, ``progress``, ``done``, ``failed``, ``retry``."""

    kind: str
    step: StepView


@dataclass
class Tracker:
    """Folds snapshots into step views and reports what changed."""

    export_id: str
    steps: dict[str, StepView] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    queued_since: float | None = None
    hinted: bool = False
    now: float = 0.0

    def update(self, snap: Snapshot, now: float | None = None) -> list[Event]:
        now = time.monotonic() if now is None else now
        self.now = now
        self.snapshot = snap
        events: list[Event] = []
        if snap.state == "PENDING" and not self.steps:
            self.queued_since = self.queued_since or now
        for status in snap.steps:
            events.extend(self._fold(status, now))
        if snap.state == "SUCCESS":
            for view in self.steps.values():
                if not view.done and not view.failed:
                    view.state, view.bytes_done = "SUCCESS", view.size
                    events.extend(self._finish(view, now, "done"))
        elif snap.state in ("FAILURE", "REVOKED"):
            # A failed finalize stops at the document it was writing.
            for view in self.steps.values():
                if view.kind != "layer" and view.running:
                    view.state, view.error = "FAILURE", snap.error
                    events.extend(self._finish(view, now, "failed"))
        return events

    def _fold(self, status: StepStatus, now: float) -> list[Event]:
        view = self.steps.get(status.name)
        if view is None:
            view = StepView(status.name, status.kind, status.digest, status.size)
            self.steps[status.name] = view
        was_done, was_failed, was_running = view.done, view.failed, view.running
        was_state = view.state
        view.state, view.status = status.state, status.status
        view.bytes_done = max(view.bytes_done, status.bytes_done)
        view.error = status.error
        events: list[Event] = []
        if (view.running or view.done or view.failed) and view.started is None:
            view.started, view.last_line = now, now
            events.append(Event("start", view))
        if view.done and not was_done:
            view.bytes_done = view.size
            events.extend(self._finish(view, now, "done"))
        elif view.failed and not was_failed:
            events.extend(self._finish(view, now, "failed"))
        elif view.state == "RETRY" and was_state != "RETRY":
            events.append(Event("retry", view))
        elif view.running and was_running and now - view.last_line >= PLAIN_PROGRESS_EVERY:
            view.last_line = now
            events.append(Event("progress", view))
        return events

    @staticmethod
    def _finish(view: StepView, now: float, kind: str) -> list[Event]:
        view.finished = now
        return [Event(kind, view)]

    @property
    def bytes_total(self) -> int:
        return sum(v.size for v in self.steps.values() if v.kind == "layer")

    @property
    def bytes_done(self) -> int:
        return sum(v.bytes_done for v in self.steps.values() if v.kind == "layer")

    def layers(self) -> tuple[int, int]:
        """(finished, all) layer steps."""
        layers = [v for v in self.steps.values() if v.kind == "layer"]
        return sum(1 for v in layers if v.done), len(layers)

    def headline(self) -> str:
        snap = self.snapshot
        if snap is None:
            return "connecting"
        if snap.state == "PENDING" and not self.steps:
            return "queued: waiting for a worker"
        if snap.state == "SUCCESS":
            return "complete"
        if snap.state in ("FAILURE", "REVOKED"):
            return "failed"
        if not self.steps:
            return "reading the source cache"
        done, total = self.layers()
        if done < total:
            return f"copying layers: {done}/{total} done"
        return snap.phase or "writing"

    def queued_too_long(self, now: float | None = None) -> bool:
        """True once (for a hint) when nothing picked the export up for a while."""
        now = self.now if now is None else now
        if self.hinted or self.queued_since is None or self.steps:
            return False
        if self.snapshot is None or self.snapshot.state != "PENDING":
            return False
        if now - self.queued_since < QUEUED_HINT_AFTER:
            return False
        self.hinted = True
        return True


def display_name(name: str, width: int) -> str:
    """The step name, its digest shortened on a narrow terminal."""
    if width >= 180:
        return name
    head, _, digest = name.rpartition(" ")
    return f"{head} {short_digest(digest)}" if digest.startswith("sha256:") else name


QUEUED_HINT = (
    "no worker has taken the export yet: is a worker running against this Redis? "
    "(start one with: cacheship worker)"
)


class PlainView:
    """One line per change, for logs: ``writing layer sha256:... uploaded 4.0 MiB 0.3s done``."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.announced = False

    @contextmanager
    def running(self) -> Iterator[PlainView]:
        yield self

    def show(self, tracker: Tracker, events: list[Event]) -> None:
        if not self.announced and tracker.steps:
            self.announced = True
            _, layers = tracker.layers()
            self.write(
                f"export {tracker.export_id}: {layers} layers, "
                f"{human_bytes(tracker.bytes_total)} to write"
            )
        for event in events:
            line = self.line(event)
            if line:
                self.write(line)
        if tracker.queued_too_long():
            self.write(QUEUED_HINT)

    @staticmethod
    def line(event: Event) -> str:
        step = event.step
        if event.kind == "start":
            return step.name if not (step.done or step.failed) else ""
        if event.kind == "progress":
            return f"{step.name} {human_bytes(step.bytes_done)} / {human_bytes(step.size)}"
        if event.kind == "retry":
            return f"{step.name} {step.mark()}"
        if event.kind == "failed":
            return f"{step.name} ERROR: {step.error or 'failed'}"
        detail = step.action
        if step.kind == "layer" and step.action == "uploaded":
            detail = f"uploaded {human_bytes(step.size)}"
        elif step.kind == "layer":
            detail = _MARKS[step.action]
        elif step.action == "done":
            detail = ""
        parts = [step.name, detail, f"{step.elapsed:.1f}s", "done"]
        return " ".join(p for p in parts if p)


class _LayerSpeed(ProgressColumn):
    """Transfer speed while bytes move, the average once done; nothing for skipped layers,
    small documents, or copies too quick to measure."""

    def render(self, task: RichTask) -> Text:
        if not task.fields.get("show_speed", False):
            return Text("")
        speed: float | None = task.fields.get("final_speed") if task.finished else task.speed
        if not speed:
            return Text("")
        return Text(f"{human_bytes(speed)}/s", style="progress.data.speed")


class RichView:
    """A live view: an overall bar, then one bar per step."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            DownloadColumn(binary_units=True),
            _LayerSpeed(),
            TextColumn("{task.fields[mark]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
        )
        self.overall: TaskID | None = None
        self.began = time.monotonic()
        self.ids: dict[str, TaskID] = {}

    @contextmanager
    def running(self) -> Iterator[RichView]:
        with self.progress:
            yield self

    def show(self, tracker: Tracker, events: list[Event]) -> None:
        width = self.console.width
        if self.overall is None:
            self.overall = self.progress.add_task(
                f"export {tracker.export_id[:8]}",
                total=None,
                mark="",
                show_speed=True,
                final_speed=None,
            )
        for name, view in tracker.steps.items():
            task_id = self.ids.get(name)
            if task_id is None:
                task_id = self.progress.add_task(
                    display_name(name, width),
                    total=max(view.size, 1),
                    start=False,
                    mark="waiting",
                    show_speed=False,
                    final_speed=None,
                )
                self.ids[name] = task_id
            if view.started is not None and not self.progress.tasks[task_id].started:
                self.progress.start_task(task_id)
            mark = view.short_mark()
            style = ""
            if view.failed:
                style = "red"
            elif view.done:
                style = "green" if view.action in ("uploaded", "done") else "cyan"
            elif view.state == "RETRY":
                style = "yellow"
            shown = f"[{style}]{_escape(mark)}[/]" if style else _escape(mark)
            copying = view.kind == "layer" and view.status not in ("skipped", "touched")
            final_speed = None
            if view.done and view.elapsed >= 0.5:
                final_speed = view.size / view.elapsed
            self.progress.update(
                task_id,
                completed=view.bytes_done,
                mark=shown,
                show_speed=copying and view.started is not None,
                final_speed=final_speed,
            )
            if (view.done or view.failed) and not self.progress.tasks[task_id].finished_time:
                self.progress.stop_task(task_id)
        elapsed = time.monotonic() - self.began
        self.progress.update(
            self.overall,
            total=tracker.bytes_total or None,
            completed=tracker.bytes_done,
            mark=_escape(tracker.headline()),
            final_speed=tracker.bytes_done / elapsed if elapsed >= 0.5 else None,
        )
        if tracker.queued_too_long():
            self.progress.console.print(f"[yellow]{_escape(QUEUED_HINT)}[/]")

    def finish(self) -> None:
        if self.overall is not None:
            self.progress.stop_task(self.overall)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def watch(
    client: Snapshots,
    export_id: str,
    console: Console,
    *,
    interval: float = 0.25,
    plain_write: Callable[[str], None] | None = None,
) -> Snapshot:
    """Follow the export until it is done; returns the final snapshot.

    KeyboardInterrupt leaves the live view cleanly and propagates: the caller says how to
    watch again (the export itself goes on).
    """
    tracker = Tracker(export_id)
    view: Any
    if console.is_terminal:
        view = RichView(console)
    else:
        view = PlainView(plain_write or (lambda line: console.print(line, markup=False)))
    with view.running():
        while True:
            snap = client.snapshot(export_id)
            events = tracker.update(snap)
            view.show(tracker, events)
            if snap.ready:
                if isinstance(view, RichView):
                    view.finish()
                return snap
            time.sleep(interval)
