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
from celery.signals import heartbeat_sent, task_received, worker_ready, worker_shutdown
from celery.utils.log import get_logger

from tasks.fleet import flight
from tasks.fleet.state import alive_key, last_seen_key
from worker import internals
from worker.app import app

logger = get_logger(__name__)

_held: weakref.WeakSet[Any] = weakref.WeakSet()
_stop = threading.Event()
_keeper: dict[str, Any] = {}  # "thread", "hostname", "app", "rounds"


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
        tag = internals.held_tag(request)
        if tag is None:
            _held.discard(request)
            continue
        tags[tag] = now
    client = internals.channel_redis(channel)
    with client.pipeline() as pipe:
        if tags:
            internals.rescore_held(channel, pipe, tags)
        pipe.set(alive_key(hostname), repr(now), ex=int(interval * 3) + 1)
        pipe.set(last_seen_key(hostname), repr(now), ex=7 * 24 * 3600)
        pipe.execute()
    return len(tags)


def _keep(celery: Celery, hostname: str) -> None:
    """Renew every ``interval``; a failed round (Redis down, a black-holed connection cut by
    its socket timeout) is tried again on a fresh connection within two seconds."""
    interval = renew_interval(float(celery.conf.broker_transport_options["visibility_timeout"]))
    while not _stop.is_set():
        try:
            with celery.connection_for_write() as conn:
                channel = conn.default_channel
                while True:
                    renew_once(channel, hostname, interval)
                    _keeper["rounds"] = _keeper.get("rounds", 0) + 1
                    # The blob locks' renewal thread, started again should it have stopped.
                    flight.ensure_renewing()
                    if _stop.wait(interval):
                        return
        except Exception as exc:  # Redis restarting: try again next round
            logger.warning("lease renewal failed (%s); retrying", type(exc).__name__)
            if _stop.wait(min(interval, 2.0)):
                return


def start_keeper(celery: Celery, hostname: str) -> threading.Thread:
    """Start the lease thread (again, when it stopped)."""
    thread = threading.Thread(target=_keep, args=(celery, hostname), name="leases", daemon=True)
    _keeper.update(thread=thread, hostname=hostname, app=celery)
    thread.start()
    return thread


def ensure_keeper() -> bool:
    """Start the lease thread again if it died; True when it had to.

    Called from the worker's event loop at every heartbeat (every few seconds): a worker
    whose renewals stopped would have its running copies handed to others after one lease.
    """
    thread = _keeper.get("thread")
    if thread is None or thread.is_alive() or _stop.is_set():
        return False
    logger.warning("lease renewal thread was not running; started again")
    start_keeper(_keeper["app"], _keeper["hostname"])
    return True


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or "unknown"
    _stop.clear()
    start_keeper(app, hostname)
    from worker import watchdog

    watchdog.start(app, hostname, _stop)


@heartbeat_sent.connect
def _check(**_: Any) -> None:
    ensure_keeper()
    flight.ensure_renewing()


@worker_shutdown.connect
def _stopped(sender: Any = None, **_: Any) -> None:
    """A worker that stops in order is not lost: its messages are put back by kombu."""
    _stop.set()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            internals.channel_redis(conn.default_channel).delete(alive_key(hostname))
