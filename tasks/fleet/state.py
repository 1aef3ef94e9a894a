"""Export bookkeeping kept in Redis beside the Celery results.

The plan (config, manifest, layer list) can be megabytes; it is stored once here instead of
riding in every chord message. Per-layer outcomes (uploaded, skipped, touched, bytes) are
kept here too, because a layer task's return value must be the same on every run for the
chord to count re-delivered parts correctly.
"""

from __future__ import annotations

import json
from typing import Any, Protocol


class RedisLike(Protocol):
    """The few Redis commands used here (redis-py's client satisfies it)."""

    def set(self, name: str, value: str, ex: int | None = ...) -> Any: ...
    def get(self, name: str) -> Any: ...
    def hsetnx(self, name: str, key: str, value: str) -> Any: ...
    def hget(self, name: str, key: str) -> Any: ...
    def hgetall(self, name: str) -> Any: ...
    def expire(self, name: str, time: int) -> Any: ...
    def delete(self, *names: str) -> Any: ...
    def pipeline(self, transaction: bool = ...) -> Any: ...


def plan_key(export_id: str) -> str:
    return f"cacheship-plan-{export_id}"


def outcomes_key(export_id: str) -> str:
    return f"cacheship-outcomes-{export_id}"


def alive_key(hostname: str) -> str:
    """Present while a worker renews its leases (it expires three renewals after)."""
    return f"cacheship-worker-alive-{hostname}"


def last_seen_key(hostname: str) -> str:
    """When a worker last renewed its leases: kept after it is gone, to say since when."""
    return f"cacheship-worker-seen-{hostname}"


def save_plan(redis: RedisLike, export_id: str, plan: dict[str, Any], ttl: int) -> None:
    redis.set(plan_key(export_id), json.dumps(plan, separators=(",", ":")), ex=ttl)


def load_plan(redis: RedisLike, export_id: str) -> dict[str, Any]:
    raw = redis.get(plan_key(export_id))
    if raw is None:
        raise LookupError(f"export {export_id}: its plan has expired or was never stored")
    plan: dict[str, Any] = json.loads(raw)
    return plan


def drop_plan(redis: RedisLike, export_id: str) -> None:
    """Forget a finished export's plan (its result holds what callers read)."""
    redis.delete(plan_key(export_id))


def record_outcome(
    redis: RedisLike, export_id: str, digest: str, outcome: dict[str, Any], ttl: int
) -> dict[str, Any]:
    """The first finished run of a layer tells what happened; re-runs do not overwrite it.

    Returns the record that won, so every run of a layer reports the same thing.
    """
    key = outcomes_key(export_id)
    pipe = redis.pipeline(transaction=True)  # one round trip: this runs once per layer
    pipe.hsetnx(key, digest, json.dumps(outcome, separators=(",", ":")))
    pipe.hget(key, digest)
    pipe.expire(key, ttl)
    stored = pipe.execute()[1]
    first: dict[str, Any] = json.loads(stored) if stored else outcome
    return first


def load_outcomes(redis: RedisLike, export_id: str) -> dict[str, dict[str, Any]]:
    raw = redis.hgetall(outcomes_key(export_id))
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
