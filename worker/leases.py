"""Leases on the messages a worker holds, so a vanished worker's work moves on in a minute.

Redis has no consumer acknowledgements of its own: kombu keeps every delivered, unacked
message in a sorted set scored by delivery time, and any live worker puts back those older
than the visibility timeout. A long timeout (hours) strands the layers of a SIGKILLed pod for
hours; a short one alone delivers every healthy long copy twice.

Here the timeout is short (``CACHESHIP_VISIBILITY_TIMEOUT``, 60 s) and the lease is renewed:
the worker's main process re-scores every message it holds (reserved, running, or waiting
for a retry's countdown) every sixth of the timeout. A healthy copy, however long, is never
redelivered; a worker that vanishes whole (main process and pool) stops renewing, and its
messages go back to the queue about one timeout later, where a live worker takes them and
resumes the parts already stored. The same thread records the worker as alive, so
``cacheship status`` can say which layers sit on a worker that is gone, and since when.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any

from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown
from celery.utils.log import get_logger

from tasks.state import alive_key, last_seen_key
from worker.app import app

logger = get_logger(__name__)

_held: weakref.WeakSet[Any] = weakref.WeakSet()
_stop = threading.Event()


def renew_interval(visibility_timeout: float) -> float:
    return max(1.0, visibility_timeout / 6)


@task_received.connect
def _hold(request: Any = None, **_: Any) -> None:
    if request is not None:
        _held.add(request)


def renew_once(channel: Any, hostname: str, interval: float, now: float | None = None) -> int:
    """Re-score the held messages and mark the worker alive; returns how many were renewed."""
    now = time.time() if now is None else now
    tags = {}
    for request in list(_held):
        if request.acknowledged:
            _held.discard(request)
            continue
        tags[request.message.delivery_tag] = now
    client = channel.client
    with client.pipeline() as pipe:
        if tags:
            # XX: only messages still unacked; an acked one must not come back.
            pipe.zadd(channel.unacked_index_key, tags, xx=True)
        pipe.set(alive_key(hostname), repr(now), ex=int(interval * 3) + 1)
        pipe.set(last_seen_key(hostname), repr(now), ex=7 * 24 * 3600)
        pipe.execute()
    return len(tags)


def _keep(celery: Celery, hostname: str) -> None:
    interval = renew_interval(float(celery.conf.broker_transport_options["visibility_timeout"]))
    while not _stop.is_set():
        try:
            with celery.connection_for_write() as conn:
                channel = conn.default_channel
                while True:
                    renew_once(channel, hostname, interval)
                    if _stop.wait(interval):
                        return
        except Exception as exc:  # Redis restarting: try again next round
            logger.warning("lease renewal failed (%s); retrying", type(exc).__name__)
            if _stop.wait(min(interval, 2.0)):
                return


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or "unknown"
    _stop.clear()
    thread = threading.Thread(target=_keep, args=(app, hostname), name="leases", daemon=True)
    thread.start()


@worker_shutdown.connect
def _stopped(sender: Any = None, **_: Any) -> None:
    """A worker that stops in order is not lost: its messages are put back by kombu."""
    _stop.set()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            channel: Any = conn.default_channel
            channel.client.delete(alive_key(hostname))
