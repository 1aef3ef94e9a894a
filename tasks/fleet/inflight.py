"""What in-flight exports will reference, known fleet-wide, so that prune never deletes it.

An export registers the digests it will reference (layers, config blob, manifest blob)
before it first looks at the bucket, and releases them once its names are written (or it
failed). A prune deletes blobs in batches; each batch starts with one atomic step that
marks "a delete batch is running" and reads every registration, and ends by clearing the
mark. Registration is one atomic step too, which reports a running batch; ``register``
then waits for that batch to end. So either the batch saw the registration, or the export
looks at the bucket only after the batch's deletes are done. The full argument, with every
interleaving, is ``docs/prune.md``.

A released export stays visible to a prune that was already running when it was released:
that prune listed the names before the export wrote them, so only the registration tells
it those blobs are live. Everything is keyed by a scope (bucket, prefix, blobs prefix),
and every step runs as a Lua script on the Redis server (its clock, one atomic step).

Keys of a scope (``{h}`` is a hash of the scope; braces keep a scope on one cluster slot):
``cacheship-gc:{h}:exports`` (sorted set: export id → until when its registration counts,
ms), ``…:digests:<export id>`` (set), ``…:epoch-at`` (hash: export id → the deletion epoch
when it registered), ``…:epoch`` (counter of delete batch starts and ends), ``…:lock`` (the
one running prune), ``…:batch`` (the running delete batch).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tasks.request import S3Spec

#: How long one delete batch may hold its mark; longer than one DeleteObjects call with its
#: retries can take, because an export waits at most this long before it looks at the bucket.
DEFAULT_BATCH_LEASE = 600.0
#: How long the prune lock lives without a heartbeat (a dead prune blocks nobody for longer).
DEFAULT_LOCK_TTL = 60.0


class RedisLike(Protocol):
    """The Redis commands used here (redis-py's client satisfies it)."""

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...
    def get(self, name: str) -> Any: ...


class RegistryError(Exception):
    """The registry cannot give the guarantee asked of it; the message says why."""


class PruneBusyError(RegistryError):
    """Another prune holds the scope."""


class PruneLockLostError(RegistryError):
    """This prune's lock expired (it stalled longer than the lock TTL): it must stop deleting."""


def scope_of(spec: S3Spec) -> str:
    """The key space a prune collects and exports register in: bucket and blob key prefix.

    The endpoint is left out on purpose: two endpoints of one store (internal and public)
    must share registrations; sharing them between two stores only protects more.
    """
    return f"{spec.bucket}/{spec.prefix}{spec.blobs_prefix}"


def _base(scope: str) -> str:
    tag = hashlib.sha256(scope.encode()).hexdigest()[:24]
    return f"cacheship-gc:{{{tag}}}:"


def _keys(scope: str) -> dict[str, str]:
    base = _base(scope)
    return {
        name: base + name for name in ("exports", "epoch-at", "epoch", "lock", "batch")
    } | {"base": base}


# Server time in ms: every deadline is compared on one clock, whatever the workers' clocks.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Drop registrations that no running or future prune can need (score < ARGV[1]).
_FORGET = """
local function forget(exports, epochs, base, before)
  local stale = redis.call('ZRANGEBYSCORE', exports, '-inf', '(' .. before)
  for _, id in ipairs(stale) do
    redis.call('DEL', base .. 'digests:' .. id)
    redis.call('HDEL', epochs, id)
  end
  if #stale > 0 then redis.call('ZREMRANGEBYSCORE', exports, '-inf', '(' .. before) end
end
"""

# KEYS: exports, epoch-at, epoch, batch, lock. ARGV: base, export id, ttl ms, digests...
_REGISTER = (
    _NOW
    + _FORGET
    + """
local id, ttl = ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[5]) == 0 then forget(KEYS[1], KEYS[2], ARGV[1], now) end
local digests = ARGV[1] .. 'digests:' .. id
for i = 4, #ARGV, 500 do
  redis.call('SADD', digests, unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
local old = tonumber(redis.call('ZSCORE', KEYS[1], id) or '0')
if old < now + ttl then redis.call('ZADD', KEYS[1], now + ttl, id) end
redis.call('HSETNX', KEYS[2], id, redis.call('GET', KEYS[3]) or '0')
return redis.call('GET', KEYS[4]) or false
"""
)

# KEYS: exports, epoch-at, lock. ARGV: base, export id.
_RELEASE = (
    _NOW
    + _FORGET
    + """
local id = ARGV[2]
if redis.call('EXISTS', KEYS[3]) == 1 then
  -- A running prune may have listed the names before this export wrote them.
  if redis.call('ZSCORE', KEYS[1], id) then redis.call('ZADD', KEYS[1], now, id) end
else
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', ARGV[1] .. 'digests:' .. id)
  redis.call('HDEL', KEYS[2], id)
  forget(KEYS[1], KEYS[2], ARGV[1], now)
end
return 1
"""
)

# KEYS: exports. ARGV: base, since (ms; empty: now).
_REGISTERED = (
    _NOW
    + """
local since = ARGV[2] ~= '' and ARGV[2] or tostring(now)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf')) do
  for _, d in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'digests:' .. id)) do
    out[#out + 1] = d
  end
end
return out
"""
)

# KEYS: lock, exports, epoch-at. ARGV: base, token, ttl ms. Returns the prune's start (ms).
_ACQUIRE = (
    _NOW
    + _FORGET
    + """
if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return false end
forget(KEYS[2], KEYS[3], ARGV[1], now)
return now
"""
)

# KEYS: lock. ARGV: token, ttl ms.
_REFRESH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lock, batch. ARGV: token.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
local batch = redis.call('GET', KEYS[2])
if batch and string.sub(batch, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  redis.call('DEL', KEYS[2])
end
return 1
"""

# KEYS: lock, batch, epoch, exports. ARGV: base, token, since (ms), lease ms.
# Returns false when the lock is not ours, else {mark, digests...}.
_BATCH_BEGIN = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return false end
local n = redis.call('INCR', KEYS[3])
local mark = ARGV[2] .. ':' .. n
redis.call('SET', KEYS[2], mark, 'PX', ARGV[4])
local out = {mark}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[3], '+inf')) do
  for _, d in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'digests:' .. id)) do
    out[#out + 1] = d
  end
end
return out
"""

# KEYS: batch, epoch. ARGV: mark. Returns 1 when the mark was still this batch's.
_BATCH_END = """
redis.call('INCR', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: epoch, epoch-at. ARGV: export id. Returns {current epoch, epoch at registration}.
_EPOCHS = """
return {redis.call('GET', KEYS[1]) or '0', redis.call('HGET', KEYS[2], ARGV[1]) or false}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def register(
    redis: RedisLike,
    scope: str,
    export_id: str,
    digests: Collection[str],
    ttl: float,
    *,
    wait: float = DEFAULT_BATCH_LEASE + 5.0,
) -> None:
    """Announce what an export will reference; call before it first looks at the bucket.

    Returns once no delete batch that might have missed this registration is running (a
    batch that starts later sees it). ``ttl`` (seconds) bounds how long a registration
    protects when its export dies without releasing it: give the export's time limit.
    Registering again (a retried task) adds digests and never shortens the registration.
    Raises ``RegistryError`` when a batch holds its mark longer than ``wait`` seconds.
    """
    k = _keys(scope)
    running = redis.eval(
        _REGISTER,
        5,
        k["exports"],
        k["epoch-at"],
        k["epoch"],
        k["batch"],
        k["lock"],
        k["base"],
        export_id,
        max(1, int(ttl * 1000)),
        *sorted(set(digests)),
    )
    if not running:
        return
    mark = _text(running)
    deadline = time.monotonic() + wait
    pause = 0.02
    while True:
        current = redis.get(k["batch"])
        if current is None or _text(current) != mark:
            return
        if time.monotonic() >= deadline:
            raise RegistryError(
                f"a prune delete batch in {scope} has been running for over {wait:.0f}s; "
                "not looking at the bucket while it may still delete"
            )
        time.sleep(pause)
        pause = min(0.5, pause * 2)


def release(redis: RedisLike, scope: str, export_id: str) -> None:
    """The export's names are written (or it failed): its digests need no more protection.

    A prune running right now keeps seeing them until it ends (it may have listed the names
    before this export wrote them); later prunes read the names instead.
    """
    k = _keys(scope)
    redis.eval(_RELEASE, 3, k["exports"], k["epoch-at"], k["lock"], k["base"], export_id)


def registered(redis: RedisLike, scope: str, since_ms: int | None = None) -> set[str]:
    """Digests protected now (or, with ``since_ms``, by registrations counting at or after it)."""
    k = _keys(scope)
    found = redis.eval(
        _REGISTERED, 1, k["exports"], k["base"], "" if since_ms is None else str(since_ms)
    )
    return {_text(d) for d in found}


def deleted_since_registered(redis: RedisLike, scope: str, export_id: str) -> bool:
    """Did any prune delete batch start or end in the scope since this export registered?

    ``finalize`` asks before writing names: when True it checks every layer in the bucket
    again instead of trusting what its layer tasks saw. An unknown registration counts as
    True (Redis lost it, or it expired): the check is cheap, a dangling name is not.
    """
    k = _keys(scope)
    current, at = redis.eval(_EPOCHS, 2, k["epoch"], k["epoch-at"], export_id)
    return at is None or at is False or _text(at) != _text(current)


class PruneLock:
    """The one prune of a scope: its start time, heartbeat and delete batches.

    Use as a context manager (``acquire_prune``); the heartbeat thread keeps the lock while
    the prune lists and reads, and a batch refuses to start once the lock was lost.
    """

    def __init__(
        self,
        redis: RedisLike,
        scope: str,
        *,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        batch_lease: float = DEFAULT_BATCH_LEASE,
    ) -> None:
        self.redis = redis
        self.scope = scope
        self.lock_ttl = lock_ttl
        self.batch_lease = batch_lease
        self.token = secrets.token_hex(12)
        self.started_ms = 0
        self.lost = False
        self.lease_exceeded = False
        self._keys = _keys(scope)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PruneLock:
        k = self._keys
        started = self.redis.eval(
            _ACQUIRE,
            3,
            k["lock"],
            k["exports"],
            k["epoch-at"],
            k["base"],
            self.token,
            int(self.lock_ttl * 1000),
        )
        if not started:
            raise PruneBusyError(f"another prune is running in {self.scope}")
        self.started_ms = int(started)
        self._thread = threading.Thread(target=self._beat, name="prune-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        k = self._keys
        self.redis.eval(_UNLOCK, 2, k["lock"], k["batch"], self.token)

    def _beat(self) -> None:
        while not self._stop.wait(self.lock_ttl / 4):
            try:
                kept = self.redis.eval(
                    _REFRESH, 1, self._keys["lock"], self.token, int(self.lock_ttl * 1000)
                )
            except Exception:
                continue  # Redis unreachable for a moment: the batch check decides
            if not kept:
                self.lost = True
                return

    def protected(self) -> set[str]:
        """Digests this prune must not delete as of now (for planning; batches recheck)."""
        return registered(self.redis, self.scope, since_ms=self.started_ms)

    @contextmanager
    def delete_batch(self) -> Iterator[set[str]]:
        """Hold the batch mark while the block deletes; yields the digests to leave alone.

        Raises ``PruneLockLostError`` before the block runs when the lock is gone. The
        ``lease_exceeded`` attribute tells afterwards whether the block outlived the mark
        (an export may then have looked at the bucket meanwhile; ``finalize`` rechecks).
        """
        k = self._keys
        found = self.redis.eval(
            _BATCH_BEGIN,
            4,
            k["lock"],
            k["batch"],
            k["epoch"],
            k["exports"],
            k["base"],
            self.token,
            str(self.started_ms),
            int(self.batch_lease * 1000),
        )
        if not found:
            self.lost = True
            raise PruneLockLostError(
                f"the prune lock of {self.scope} expired (the prune stalled); stopped deleting"
            )
        mark, digests = _text(found[0]), {_text(d) for d in found[1:]}
        try:
            yield digests
        finally:
            kept = self.redis.eval(_BATCH_END, 2, k["batch"], k["epoch"], mark)
            self.lease_exceeded = self.lease_exceeded or not kept


def acquire_prune(
    redis: RedisLike,
    scope: str,
    *,
    lock_ttl: float = DEFAULT_LOCK_TTL,
    batch_lease: float = DEFAULT_BATCH_LEASE,
) -> PruneLock:
    """The scope's prune lock, to be entered with ``with``; raises ``PruneBusyError`` there."""
    return PruneLock(redis, scope, lock_ttl=lock_ttl, batch_lease=batch_lease)


class RegistryView:
    """A dry run's guard: it reads what is registered and never holds a batch mark."""

    def __init__(self, redis: RedisLike, scope: str) -> None:
        self.redis = redis
        self.scope = scope

    def protected(self) -> set[str]:
        return registered(self.redis, self.scope)

    @contextmanager
    def delete_batch(self) -> Iterator[set[str]]:
        raise RegistryError("a dry run deletes nothing")
        yield set()  # pragma: no cover - makes this a generator
