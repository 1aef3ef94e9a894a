"""Single flight per blob across the fleet: one writer uploads, the others wait and skip.

Build farms export the same base layers from many builds at once. Without coordination each
export that finds a blob missing uploads it too. A short-lived Redis lock per (bucket, key)
makes the first writer the only one; the others wait until it is released, then find the
blob by HEAD and count it as skipped. The lock is a lease: its holder renews it while it
writes, so a holder that dies (SIGKILL, node loss) frees the blob within ``ttl`` seconds and
a waiter takes over, resuming the parts already stored.

The lock is a key holding its holder's random token, written with plain commands (``SET NX
PX`` and two small scripts), so that every step is safe when the client sends a command again
after losing its reply (a Redis restart, a cut connection):

- acquiring: a ``SET NX`` that finds the key already holding *our* token is ours (our first
  attempt reached Redis; only its answer was lost);
- renewing: while Redis is unreachable the lease stays held here and renewal is tried again
  every tick; once Redis answers, a key that expired meanwhile (a long outage) is written
  again with our token, provided nobody else took it: the lease resumes;
- releasing: deletes the key only while it holds our token.

One thread per process renews every lease the process holds. It catches every error of a
renewal; should it stop all the same, the next lock taken and the worker's lease thread
(``worker/leases.py``, every few seconds) start it again (:func:`ensure_renewing`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

logger = logging.getLogger(__name__)

# Long enough to ride out a pause of the holder's process; short enough that a dead holder
# delays its waiters by seconds, not minutes.
LEASE_SECONDS = 30.0


#: How long a writer's mark says "stored lately": longer than an export waits in a queue
#: between its look at the bucket and its upload, on any sane day.
STORED_MARK_SECONDS = 24 * 3600

#: KEYS[1] the lock, ARGV[1] our token, ARGV[2] the lease in ms. 1: renewed; 2: the key had
#: expired and was written again with our token (resumed); 0: someone else holds it.
_RENEW = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

#: KEYS[1] the lock, ARGV[1] our token: deleted only while ours.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def stored_mark(name: str) -> str:
    """Set by the lock's holder once it stored the blob: later holders must look first."""
    return f"{name}-stored"


def lock_key(bucket: str, key: str) -> str:
    """One lock name per stored object, of bounded length whatever the key."""
    digest = hashlib.sha256(f"{bucket}\0{key}".encode()).hexdigest()[:32]
    return f"cacheship-flight-{digest}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class Lease:
    """A lock key holding this holder's token; see the module's docstring."""

    def __init__(self, redis: Any, name: str, ttl: float) -> None:
        self.redis, self.name, self.ttl = redis, name, ttl
        self.token = uuid.uuid4().hex
        #: Set when another holder was found in the key: this lease is lost for good.
        self.lost = False

    @property
    def _ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def try_acquire(self) -> bool:
        """Take the key if free. A retried ``SET NX`` whose first attempt won reads our token
        back: that is a win, not a loss."""
        if self.redis.set(self.name, self.token, nx=True, px=self._ms):
            return True
        return _text(self.redis.get(self.name)) == self.token

    def renew(self) -> int:
        """1 renewed, 2 resumed after the key expired, 0 lost to another holder."""
        return int(self.redis.eval(_RENEW, 1, self.name, self.token, self._ms))

    def release(self) -> None:
        self.redis.eval(_RELEASE, 1, self.name, self.token)


class Renewals:
    """Renews every lease this process holds, each every third of its ttl (one thread: a
    thread per upload cost more than the whole upload of a small blob)."""

    TICK = 1.0

    def __init__(self) -> None:
        self._held: dict[int, tuple[Lease, float]] = {}  # id -> (lease, when due)
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, lease: Lease) -> None:
        with self._mutex:
            self._held[id(lease)] = (lease, time.monotonic() + lease.ttl / 3)
        self.ensure_running()

    def drop(self, lease: Lease) -> None:
        with self._mutex:
            self._held.pop(id(lease), None)

    def held(self) -> list[Lease]:
        with self._mutex:
            return [lease for lease, _ in self._held.values()]

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def ensure_running(self) -> bool:
        """Start the thread when it is not running (never started, died, or this process is
        a fork whose parent ran it); True when it had to be started while leases were held."""
        with self._mutex:
            if self._thread is not None and self._thread.is_alive():
                return False
            restarted = self._thread is not None and bool(self._held)
            self._thread = threading.Thread(target=self._run, name="flight-leases", daemon=True)
            self._thread.start()
        if restarted:
            logger.warning("lock renewal thread was not running; started again")
        return restarted

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            self.tick()

    def tick(self, now: float | None = None) -> None:
        """Renew the leases that are due; errors leave them held, to be tried next tick."""
        now = time.monotonic() if now is None else now
        with self._mutex:
            due = [(key, lease) for key, (lease, at) in self._held.items() if at <= now]
        for key, lease in due:
            try:
                answer = lease.renew()
            except Exception as exc:
                # Redis unreachable: keep the lease and try again at the next tick. Should the
                # key expire meanwhile, the renewal writes it again once Redis is back.
                logger.warning("lock %s: renewal failed (%s); retrying", lease.name,
                               type(exc).__name__)
                continue
            with self._mutex:
                if answer == 0:
                    lease.lost = True
                    self._held.pop(key, None)
                    logger.warning("lock %s: taken by another holder while ours expired",
                                   lease.name)
                elif key in self._held:
                    self._held[key] = (lease, now + lease.ttl / 3)


_renewals = Renewals()


def ensure_renewing() -> bool:
    """Start this process's renewal thread if it is not running (see :class:`Renewals`)."""
    return _renewals.ensure_running()


@contextmanager
def single_flight(
    redis: Any,
    name: str,
    *,
    ttl: float = LEASE_SECONDS,
    poll: float = 0.2,
    on_wait: Callable[[], None] = lambda: None,
    on_tick: Callable[[], None] = lambda: None,
) -> Iterator[Lease]:
    """Hold ``name`` fleet-wide while the body runs; wait (calling ``on_wait`` once) if held.

    The lock is renewed every third of ``ttl`` while held, so it outlives any copy however
    long, and lapses ``ttl`` seconds after this process is gone. ``on_tick`` is called about
    every ``ttl / 3`` seconds while waiting (the waiter is alive and its work moves on).
    """
    lease = Lease(redis, name, ttl)
    if not lease.try_acquire():
        on_wait()
        ticked = time.monotonic()
        while not lease.try_acquire():
            time.sleep(poll)
            if time.monotonic() - ticked >= ttl / 3:
                ticked = time.monotonic()
                on_tick()
    _renewals.hold(lease)
    try:
        yield lease
    finally:
        _renewals.drop(lease)
        with suppress(Exception):  # Redis gone: the key lapses with its ttl
            lease.release()


def renewing() -> bool:
    """True while this process's renewal thread runs."""
    return _renewals.running()
