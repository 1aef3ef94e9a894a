"""Single flight per blob across the fleet: one writer uploads, the others wait and skip.

Build farms export the same base layers from many builds at once. Without coordination each
export that finds a blob missing uploads it too. A short-lived Redis lock per (bucket, key)
makes the first writer the only one; the others wait until it is released, then find the
blob by HEAD and count it as skipped. The lock is a lease: its holder renews it while it
writes, so a holder that dies (SIGKILL, node loss) frees the blob within ``ttl`` seconds and
a waiter takes over, resuming the parts already stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from redis.lock import Lock

# Long enough to ride out a pause of the holder's process; short enough that a dead holder
# delays its waiters by seconds, not minutes.
LEASE_SECONDS = 30.0


#: How long a writer's mark says "stored lately": longer than an export waits in a queue
#: between its look at the bucket and its upload, on any sane day.
STORED_MARK_SECONDS = 24 * 3600


def stored_mark(name: str) -> str:
    """Set by the lock's holder once it stored the blob: later holders must look first."""
    return f"{name}-stored"


def lock_key(bucket: str, key: str) -> str:
    """One lock name per stored object, of bounded length whatever the key."""
    digest = hashlib.sha256(f"{bucket}\0{key}".encode()).hexdigest()[:32]
    return f"cacheship-flight-{digest}"


class _Renewals:
    """One thread per process renews every lease the process holds, each every third of its
    ttl: a thread per upload cost more than the whole upload of a small blob."""

    TICK = 1.0

    def __init__(self) -> None:
        self._held: dict[int, tuple[Lock, float, float]] = {}  # id -> (lock, due, ttl)
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, lock: Lock, ttl: float) -> None:
        with self._mutex:
            self._held[id(lock)] = (lock, time.monotonic() + ttl / 3, ttl)
            # After a fork (prefork pool) the parent's thread is not running here.
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
                self._thread.start()

    def drop(self, lock: Lock) -> None:
        with self._mutex:
            self._held.pop(id(lock), None)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._mutex:
                due = [(key, lock, ttl) for key, (lock, at, ttl) in self._held.items() if at <= now]
            for key, lock, ttl in due:
                try:
                    lock.reacquire()
                except Exception:
                    # Released meanwhile, or lost (expired during a long Redis outage): the
                    # upload stays safe, since a second writer stores the same bytes.
                    with self._mutex:
                        self._held.pop(key, None)
                    continue
                with self._mutex:
                    if key in self._held:
                        self._held[key] = (lock, now + ttl / 3, ttl)


_renewals = _Renewals()


@contextmanager
def single_flight(
    redis: Any,
    name: str,
    *,
    ttl: float = LEASE_SECONDS,
    poll: float = 0.2,
    on_wait: Callable[[], None] = lambda: None,
) -> Iterator[None]:
    """Hold ``name`` fleet-wide while the body runs; wait (calling ``on_wait`` once) if held.

    The lock is renewed every third of ``ttl`` while held, so it outlives any copy however
    long, and lapses ``ttl`` seconds after this process is gone.
    """
    lock = Lock(redis, name, timeout=ttl, sleep=poll, thread_local=False)
    if not lock.acquire(blocking=False):
        on_wait()
        lock.acquire(blocking=True)
    _renewals.hold(lock, ttl)
    try:
        yield
    finally:
        _renewals.drop(lock)
        with contextlib.suppress(Exception):  # expired meanwhile: nothing to release
            lock.release()
