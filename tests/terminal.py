"""Run a command on a pseudo-terminal and read its screen as a user would see it.

The command gets a real pty of a chosen size (rich sees a terminal, asks its size); what it
writes is fed to ``pyte``, a VT100 emulator, so tests read the screen itself: the lines a
person would have in front of them, not the escape codes. The child's own CPU time comes
from ``wait4``, for the benchmark.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyte

#: Output paused this long means a frame is complete.
QUIET = 0.03


@dataclass
class Screen:
    """One moment of the screen: its lines (trailing blanks removed) and when."""

    at: float
    lines: list[str]

    @property
    def used(self) -> int:
        """Rows from the top to the last non-blank one."""
        filled = [i for i, line in enumerate(self.lines) if line.strip()]
        return filled[-1] + 1 if filled else 0

    def text(self) -> str:
        return "\n".join(self.lines[: self.used])


@dataclass
class TerminalRun:
    """What a command did on the terminal."""

    exit_code: int
    cpu_seconds: float  # user + system time of the command itself
    wall_seconds: float
    screens: list[Screen] = field(default_factory=list)
    scrollback: list[str] = field(default_factory=list)

    @property
    def final(self) -> Screen:
        return self.screens[-1]


class _History(pyte.HistoryScreen):  # type: ignore[misc]
    pass


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _lines(screen: pyte.Screen) -> list[str]:
    return [str(line).rstrip() for line in screen.display]


def run_in_terminal(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    rows: int = 50,
    cols: int = 160,
    timeout: float = 600.0,
    every: float = 0.25,
    on_screen: Callable[[Screen], None] | None = None,
) -> TerminalRun:
    """Run ``argv`` on a ``rows`` × ``cols`` terminal until it exits; sample the screen
    about every ``every`` seconds (and once at the end)."""
    master, slave = os.openpty()
    _set_size(slave, rows, cols)
    screen = _History(cols, rows, history=10_000)
    stream = pyte.ByteStream(screen)
    began = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)},
        start_new_session=True,
        close_fds=True,
    )
    os.close(slave)
    run = TerminalRun(exit_code=-1, cpu_seconds=0.0, wall_seconds=0.0)
    last = 0.0
    try:
        while True:
            ready, _, _ = select.select([master], [], [], every)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal (it exited)
                    data = b""
                if not data:
                    break
                stream.feed(data)
            now = time.monotonic()
            if now - last >= every and not select.select([master], [], [], QUIET)[0]:
                # Only between frames: a frame larger than the pty's buffer arrives in parts.
                last = now
                shot = Screen(now - began, _lines(screen))
                run.screens.append(shot)
                if on_screen is not None:
                    on_screen(shot)
            if now - began > timeout:
                raise TimeoutError(f"{argv[0]} still running after {timeout:.0f}s")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        run.exit_code = proc.returncode
        run.cpu_seconds = usage.ru_utime + usage.ru_stime
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        os.close(master)
    run.wall_seconds = time.monotonic() - began
    run.screens.append(Screen(run.wall_seconds, _lines(screen)))
    run.scrollback = [
        "".join(line[x].data for x in range(cols)).rstrip() for line in screen.history.top
    ]
    return run
