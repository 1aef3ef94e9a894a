"""Following an export: step tracking, a live view for terminals, plain lines for logs.

Steps carry BuildKit's own progress names (``writing layer sha256:...``, ``writing config
sha256:...``, ``writing cache manifest sha256:...``). On a terminal the view is a fixed-size
screen whatever the number of layers: the phase, aggregate bars (layers, bytes with speed and
ETA), the few layers running or finished last, one line counting the rest, failures always,
and the config and manifest steps. It is redrawn once per poll from counters the tracker
keeps, so a cache of thousands of layers costs the same per frame as one of five.
Elsewhere (CI logs, pipes) one line is printed when a step starts, every few seconds while a
big layer copies, and when it ends, like ``docker buildx build --progress=plain``, with an
aggregate line now and then.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from worker.cli.common import human_bytes, short_digest
from worker.client import RedisOutage, Snapshot, StepStatus, redis_down_errors

ACTIONS = frozenset({"uploaded", "skipped", "touched"})
RUNNING = frozenset({"STARTED", "PROGRESS", "RECEIVED"})
FAILED = frozenset({"FAILURE", "LOST"})
#: A layer revoked once its export failed: not copied, and not a failure of its own.
CANCELLED = "REVOKED"
QUEUED_HINT_AFTER = 15.0
PLAIN_PROGRESS_EVERY = 10.0
#: Seconds of history behind a speed: long enough to smooth small layers finishing in
#: bursts, short enough that a stall shows as a falling speed within seconds.
SPEED_WINDOW = 5.0
#: A running layer whose bytes have not moved for this long is waiting on S3 (its last
#: parts in flight, the upload being completed), not reading.
STALLED_AFTER = 2.0
#: Layer rows on a terminal (fewer when the screen is short).
MAX_ROWS = 12

_MARKS = {
    "uploaded": "uploaded",
    "skipped": "skipped: already in the bucket",
    "touched": "touched: already in the bucket, refreshed",
    "mounted": "mounted: linked from the source repository",
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
    moved: float = 0.0  # when its bytes last changed
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))

    @property
    def done(self) -> bool:
        return self.state == "SUCCESS" or (self.state == "PROGRESS" and self.status in ACTIONS)

    @property
    def failed(self) -> bool:
        return self.state in FAILED

    @property
    def cancelled(self) -> bool:
        return self.state == CANCELLED

    @property
    def settled(self) -> bool:
        return self.done or self.failed or self.cancelled

    @property
    def running(self) -> bool:
        return not self.settled and self.state in RUNNING | {"RETRY"}

    @property
    def action(self) -> str:
        """uploaded / skipped / touched once known, else done."""
        return self.status if self.status in ACTIONS else "done"

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.started

    def speed(self, now: float) -> float | None:
        """Bytes per second over the last few seconds, falling while nothing moves."""
        if self.done and self.finished is not None and self.started is not None:
            took = self.finished - self.started
            copied = self.kind == "layer" and self.action == "uploaded"
            return self.size / took if copied and took >= 0.5 else None
        return window_speed(self.samples, now)

    def short_mark(self, now: float | None = None) -> str:
        """One phrase for a row: the error itself is printed once the view ends."""
        if self.failed:
            return "failed"
        if self.cancelled:
            return "cancelled"
        if self.done:
            return self.action
        if self.state == "RETRY":
            return "retrying"
        if self.running:
            if self.kind != "layer":
                return "writing"
            if self.status in ("completing", "worker lost"):
                return "completing upload" if self.status == "completing" else self.status
            stalled = now is not None and self.bytes_done and now - self.moved >= STALLED_AFTER
            return "waiting on S3" if stalled else "copying"
        return "queued"

    def mark(self) -> str:
        if self.failed:
            return f"failed: {self.error}" if self.error else "failed"
        if self.cancelled:
            return "cancelled: the export failed"
        if self.done:
            return _MARKS[self.action]
        if self.state == "RETRY":
            return f"retrying: {self.error}" if self.error else "retrying"
        if self.running:
            return "writing" if self.kind != "layer" else self.status
        return "waiting"


def window_speed(samples: deque[tuple[float, int]], now: float) -> float | None:
    """Rate between the oldest sample in the window and now (None before a second)."""
    while len(samples) > 1 and now - samples[1][0] >= SPEED_WINDOW:
        samples.popleft()
    if not samples:
        return None
    first_at, first = samples[0]
    last = samples[-1][1]
    span = now - first_at
    if span < 1.0:
        return None
    return max(last - first, 0) / span


@dataclass
class Event:
    """A change worth a line in a log: ``start``, ``progress``, ``done``, ``failed``, ``retry``."""

    kind: str
    step: StepView


@dataclass
class Counts:
    """The layer counters every frame shows, kept up to date by :meth:`Tracker.update`."""

    layers: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    retrying: int = 0
    uploaded: int = 0
    skipped: int = 0
    touched: int = 0
    bytes_total: int = 0
    bytes_done: int = 0

    @property
    def queued(self) -> int:
        return self.layers - self.done - self.failed - self.cancelled - self.running


@dataclass
class Tracker:
    """Folds snapshots into step views, counts them, and reports what changed."""

    export_id: str
    steps: dict[str, StepView] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    queued_since: float | None = None
    hinted: bool = False
    now: float = 0.0
    began: float | None = None
    counts: Counts = field(default_factory=Counts)
    finished_order: list[str] = field(default_factory=list)
    failed_order: list[str] = field(default_factory=list)
    bytes_samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    def update(self, snap: Snapshot, now: float | None = None) -> list[Event]:
        now = time.monotonic() if now is None else now
        self.now = now
        self.began = now if self.began is None else self.began
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
        elif snap.state in FAILED or snap.state == CANCELLED:
            # A failed finalize stops at the document it was writing.
            for view in self.steps.values():
                if view.kind != "layer" and view.running:
                    view.state, view.error = "FAILURE", snap.error
                    events.extend(self._finish(view, now, "failed"))
        self._count(now)
        return events

    def _count(self, now: float) -> None:
        counts = Counts()
        for view in self.steps.values():
            if view.kind != "layer":
                continue
            counts.layers += 1
            counts.bytes_total += view.size
            counts.bytes_done += view.bytes_done
            if view.done:
                counts.done += 1
                if view.action in ACTIONS:
                    setattr(counts, view.action, getattr(counts, view.action) + 1)
            elif view.failed:
                counts.failed += 1
            elif view.cancelled:
                counts.cancelled += 1
            elif view.running:
                counts.running += 1
                counts.retrying += view.state == "RETRY"
        self.counts = counts
        if self.steps:
            self.bytes_samples.append((now, counts.bytes_done))

    def _fold(self, status: StepStatus, now: float) -> list[Event]:
        view = self.steps.get(status.name)
        if view is None:
            view = StepView(status.name, status.kind, status.digest, status.size)
            self.steps[status.name] = view
        elif view.done or view.cancelled or (view.failed and status.state == view.state):
            return []  # settled: nothing more to learn
        was_done, was_failed, was_running = view.done, view.failed, view.running
        was_state = view.state
        view.state, view.status = status.state, status.status
        if status.bytes_done > view.bytes_done:
            view.bytes_done, view.moved = status.bytes_done, now
        view.error = status.error
        events: list[Event] = []
        if (view.running or view.done or view.failed) and view.started is None:
            view.started, view.last_line, view.moved = now, now, now
            view.samples.append((now, view.bytes_done))
            events.append(Event("start", view))
        elif view.running:
            view.samples.append((now, view.bytes_done))
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

    def _finish(self, view: StepView, now: float, kind: str) -> list[Event]:
        view.finished = now
        if view.kind == "layer":
            (self.failed_order if kind == "failed" else self.finished_order).append(view.name)
        return [Event(kind, view)]

    @property
    def bytes_total(self) -> int:
        return self.counts.bytes_total

    @property
    def bytes_done(self) -> int:
        return self.counts.bytes_done

    def layers(self) -> tuple[int, int]:
        """(finished, all) layer steps."""
        return self.counts.done, self.counts.layers

    def speed(self) -> float | None:
        """Bytes per second of the whole export over the last few seconds."""
        return window_speed(self.bytes_samples, self.now)

    def eta(self) -> float | None:
        speed = self.speed()
        left = self.counts.bytes_total - self.counts.bytes_done
        if not speed or left <= 0 or self.phase() != "copying":
            return None
        return left / speed

    def elapsed(self) -> float:
        """Since the export was enqueued when Redis knows it (a re-attached view keeps its
        clock), else since watching began."""
        snap = self.snapshot
        if snap is not None and snap.submitted_at is not None:
            return max(time.time() - snap.submitted_at, 0.0)
        return self.now - (self.began if self.began is not None else self.now)

    def phase(self) -> str:
        """queued, reading, copying, verifying, writing, complete or failed."""
        snap = self.snapshot
        if snap is None:
            return "connecting"
        if snap.state == "SUCCESS":
            return "complete"
        if snap.state in FAILED or snap.state == CANCELLED:
            return "failed"
        if not self.steps:
            return "queued" if snap.state == "PENDING" else "reading"
        if self.counts.done + self.counts.failed + self.counts.cancelled < self.counts.layers:
            return "copying"
        return snap.phase if snap.phase in ("verifying", "writing") else "writing"

    def headline(self) -> str:
        phase = self.phase()
        if phase == "connecting":
            return "connecting"
        if phase == "queued":
            return "queued: waiting for a worker"
        if phase == "reading":
            return "reading the source cache"
        if phase == "copying":
            done, total = self.layers()
            return f"copying layers: {done}/{total} done"
        if phase == "verifying":
            return "verifying: every layer is in the bucket"
        if phase == "writing":
            documents = (v for v in self.steps.values() if v.kind != "layer" and v.running)
            current = next(documents, None)
            if current is not None:
                return f"writing {current.name.split(' sha256:')[0][8:]}"
            doing = self.snapshot.current if self.snapshot is not None else ""
            return f"writing: {doing}" if doing else "writing"
        return phase

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


def clock(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def aggregate_line(tracker: Tracker) -> str:
    """``copying layers: 312/600 done, 19.5 MiB / 37.5 MiB, 3.2 MiB/s, ETA 0:06``."""
    counts = tracker.counts
    parts = [
        tracker.headline(),
        f"{human_bytes(counts.bytes_done)} / {human_bytes(counts.bytes_total)}",
    ]
    speed = tracker.speed()
    if speed:
        parts.append(f"{human_bytes(speed)}/s")
    eta = tracker.eta()
    if eta is not None:
        parts.append(f"ETA {clock(eta)}")
    if counts.failed:
        parts.append(f"{counts.failed} failed")
    if counts.cancelled:
        parts.append(f"{counts.cancelled} cancelled")
    return ", ".join(parts)


class PlainView:
    """One line per change, for logs: ``writing layer sha256:... uploaded 4.0 MiB 0.3s done``."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.announced = False
        self.last_aggregate: float | None = None

    @contextmanager
    def running(self) -> Iterator[PlainView]:
        yield self

    def note(self, line: str) -> None:
        self.write(line)

    def show(self, tracker: Tracker, events: list[Event]) -> None:
        if not self.announced and tracker.steps:
            self.announced = True
            self.last_aggregate = tracker.now
            _, layers = tracker.layers()
            self.write(
                f"export {tracker.export_id}: {layers} layers, "
                f"{human_bytes(tracker.bytes_total)} to write"
            )
        for event in events:
            line = self.line(event)
            if line:
                self.write(line)
        if (
            self.last_aggregate is not None
            and tracker.phase() == "copying"
            and tracker.now - self.last_aggregate >= PLAIN_PROGRESS_EVERY
        ):
            self.last_aggregate = tracker.now
            self.write(aggregate_line(tracker))
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


# --- the terminal screen ------------------------------------------------------------------

_BAR = "━"
_STYLES = {
    "failed": "red",
    "cancelled": "bright_black",
    "uploaded": "green",
    "done": "green",
    "skipped": "cyan",
    "touched": "cyan",
    "retrying": "yellow",
    "waiting on S3": "yellow",
    "worker lost": "red",
}


def bar(done: int, total: int, width: int, style: str = "magenta") -> Text:
    """A bar of ``width`` cells; grey when the total is not known yet."""
    if total <= 0:
        return Text(_BAR * width, style="bright_black")
    filled = min(width, width * done // total)
    return Text.assemble(
        (_BAR * filled, "green" if done >= total else style),
        (_BAR * (width - filled), "bright_black"),
    )


def screen_rows(height: int) -> int:
    """Layer rows that fit: the screen minus the head (4), the tail (3) and the cursor line."""
    return max(2, min(MAX_ROWS, height - 8))


def pick_rows(tracker: Tracker, rows: int) -> tuple[list[StepView], int]:
    """Failures first (always), then running layers, then those finished last.

    Returns the rows and how many failures did not fit.
    """
    steps = tracker.steps
    failed = [steps[name] for name in tracker.failed_order]
    shown = failed[: max(rows - 1, 1)] if len(failed) > rows else failed
    hidden_failures = len(failed) - len(shown)
    if hidden_failures:
        return shown, hidden_failures  # the last row says how many more failed
    room = rows - len(shown)
    if room > 0:
        running = [v for v in steps.values() if v.kind == "layer" and v.running]
        running.sort(key=lambda v: v.started or 0.0)
        shown.extend(running[:room])
        room = rows - len(shown)
    if room > 0:
        recent = [steps[name] for name in tracker.finished_order[-room:]]
        shown.extend(reversed(recent))
    return shown, hidden_failures


def _row(view: StepView, name_width: int, width: int, now: float) -> Text:
    mark = view.short_mark(now)
    style = _STYLES.get(view.action, "green") if view.done else _STYLES.get(mark, "")
    moves_bytes = view.kind == "layer" and view.status not in ("skipped", "touched")
    speed = view.speed(now) if moves_bytes else None
    size = (
        f"{human_bytes(view.bytes_done)} / {human_bytes(view.size)}"
        if view.kind == "layer"
        else human_bytes(view.size)
    )
    elapsed = ""
    if view.started is not None:
        elapsed = " " + clock((view.finished or now) - view.started)
    tail = Text.assemble(
        " ",
        bar(view.bytes_done, view.size, 12),
        f" {size:>21} ",
        (f"{human_bytes(speed)}/s" if speed else "").rjust(12),
        " ",
        (mark, style),
        elapsed,
    )
    name = display_name(view.name, width)
    room = max(min(name_width, width - tail.cell_len - 2), 16)
    name = name[: room - 1] + "…" if len(name) > room else name.ljust(room)
    line = Text.assemble("  " + name, tail)
    line.truncate(width, overflow="ellipsis")
    return line


def screen(tracker: Tracker, width: int, height: int) -> list[Text]:
    """The whole frame, at most ``height - 1`` lines, none wider than ``width``.

    Its cost depends on the rows shown, not on the number of layers (the counts are kept by
    the tracker).
    """
    now = tracker.now
    counts = tracker.counts
    phase = tracker.phase()
    head_style = {"failed": "bold red", "complete": "bold green"}.get(phase, "bold")
    lines = [
        Text.assemble(
            (f"export {tracker.export_id[:8]}  ", "bold"),
            (tracker.headline(), head_style),
            f"  {clock(tracker.elapsed())}",
        )
    ]
    bar_width = max(10, min(30, width - 70))
    detail = [f"{counts.uploaded} uploaded", f"{counts.skipped} skipped"]
    if counts.touched:
        detail.append(f"{counts.touched} touched")
    if counts.running:
        detail.append(f"{counts.running} running")
    if counts.failed:
        detail.append(f"{counts.failed} failed")
    if counts.cancelled:
        detail.append(f"{counts.cancelled} cancelled")
    total = str(counts.layers) if tracker.steps else "?"
    lines.append(
        Text.assemble(
            "layers ",
            bar(counts.done, counts.layers, bar_width),
            f" {counts.done}/{total}  ",
            (", ".join(detail), "red" if counts.failed else ""),
        )
    )
    speed, eta = tracker.speed(), tracker.eta()
    byte_parts = [
        f" {human_bytes(counts.bytes_done)} / "
        + (human_bytes(counts.bytes_total) if tracker.steps else "?")
    ]
    if speed:
        byte_parts.append(f"{human_bytes(speed)}/s")
    if eta is not None:
        byte_parts.append(f"ETA {clock(eta)}")
    lines.append(
        Text.assemble(
            "bytes  ", bar(counts.bytes_done, counts.bytes_total, bar_width), "  ".join(byte_parts)
        )
    )
    rows, hidden_failures = pick_rows(tracker, screen_rows(height))
    documents = [v for v in tracker.steps.values() if v.kind != "layer"]
    name_width = max((len(display_name(v.name, width)) for v in [*rows, *documents]), default=0)
    for view in rows:
        lines.append(_row(view, name_width, width, now))
    rest = counts.layers - sum(1 for v in rows if v.kind == "layer")
    if hidden_failures:
        lines.append(
            Text(
                f"  … {hidden_failures} more failed layers: cacheship status "
                f"{tracker.export_id} lists them",
                style="red",
            )
        )
    if rest > 0:
        shown_done = sum(1 for v in rows if v.done)
        shown_running = sum(1 for v in rows if v.running)
        shown_failed = sum(1 for v in rows if v.failed)
        parts = [
            f"{n} {word}"
            for n, word in (
                (counts.queued, "queued"),
                (counts.running - shown_running, "running"),
                (counts.done - shown_done, "done"),
                (counts.failed - shown_failed - hidden_failures, "failed"),
                (counts.cancelled - sum(1 for v in rows if v.cancelled), "cancelled"),
            )
            if n > 0
        ]
        lines.append(Text(f"  … {rest} more layers: {', '.join(parts)}", style="bright_black"))
    for view in documents:
        lines.append(_row(view, name_width, width, now))
    for line in lines:
        line.no_wrap = True
        line.truncate(width, overflow="ellipsis")
    return lines[: max(height - 1, 1)]


class LiveView:
    """The terminal screen, redrawn once per poll (never by a background thread)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(
            console=console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
            vertical_overflow="crop",
        )

    @contextmanager
    def running(self) -> Iterator[LiveView]:
        with self.live:
            yield self

    def show(self, tracker: Tracker, events: list[Event]) -> None:
        width, height = self.console.size
        self.live.update(Group(*screen(tracker, width, height)), refresh=True)
        if tracker.queued_too_long():
            self.live.console.print(Text(QUEUED_HINT, style="yellow"))

    def finish(self) -> None:
        """Nothing to stop: the last frame stays on screen."""

    def note(self, line: str) -> None:
        """A line above the screen (e.g. waiting for Redis)."""
        self.live.console.print(Text(line, style="yellow"))


def watch(
    client: Snapshots,
    export_id: str,
    console: Console,
    *,
    interval: float = 0.25,
    plain_write: Callable[[str], None] | None = None,
    patience: float = 0.0,
    where: str = "",
) -> Snapshot:
    """Follow the export until it is done; returns the final snapshot.

    ``patience``: seconds an unreachable Redis at ``where`` is waited for (saying so) before
    its error is raised; 0 raises at once.

    KeyboardInterrupt leaves the live view cleanly and propagates: the caller says how to
    watch again (the export itself goes on).
    """
    tracker = Tracker(export_id)
    view: Any
    if console.is_terminal:
        view = LiveView(console)
    else:
        view = PlainView(plain_write or (lambda line: console.print(line, markup=False)))
    outage = RedisOutage(where, patience, view.note) if patience else None
    down = redis_down_errors()
    with view.running():
        while True:
            began = time.monotonic()
            try:
                snap = client.snapshot(export_id)
            except down as exc:
                if outage is None:
                    raise
                outage.failed(exc)  # raises once Redis was gone longer than the patience
                time.sleep(max(interval, 1.0))
                continue
            if outage is not None:
                outage.ok()
            events = tracker.update(snap)
            view.show(tracker, events)
            if snap.ready:
                return snap
            # A slow Redis (or a huge export) makes polls long: never poll back to back.
            time.sleep(max(interval - (time.monotonic() - began), interval / 4))
