"""Liveness without a process per probe: the worker touches a heartbeat file.

The file is touched from Celery's own heartbeat (sent every few seconds by the worker's event
loop), so it goes stale exactly when the worker stops making progress; a probe only checks
the file's age.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery.signals import heartbeat_sent, worker_ready, worker_shutdown

from tasks.settings import get_settings


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path)


@worker_ready.connect
@heartbeat_sent.connect
def beat(**_: Any) -> None:
    """Mark the worker alive."""
    path = get_settings().heartbeat_file
    if path is not None:
        _touch(path)


@worker_shutdown.connect
def stopped(**_: Any) -> None:
    """A stopping worker is not alive any more."""
    path = get_settings().heartbeat_file
    if path is not None:
        path.unlink(missing_ok=True)
