"""Scenario 11: what one export leaves in Redis once it has ended, at 10, 300 and 3,000 layers.

Every key the export created is found by listing the keys before and after it (``SCAN``),
leaving out what belongs to the fleet rather than the export (the broker's own bindings and
queues, worker liveness). Each key's size is Redis' ``MEMORY USAGE KEY SAMPLES 0`` (the
value's allocation with its key and overheads, every element counted), its lifetime ``TTL``.
A key counts as kept when it outlives ``CACHESHIP_LAYER_RESULTS_EXPIRES``: that is what a farm
pays for ``CACHESHIP_RESULT_EXPIRES`` (7 days) per export. The rest is transient: it is gone
minutes after the end, and is about what every export kept for the week before the ledger.

Each size runs twice: into an empty prefix (every layer uploaded by its own task) and again
with every blob present (no task: the export finds them stored). The bound is a fixed
``FIXED_BYTES`` plus ``PER_LAYER_BYTES`` a layer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from bench.stack import drop_prefix, new_prefix
from tasks.settings import Settings

if TYPE_CHECKING:
    from bench.data import BenchCache
    from bench.scenarios import Context, Row

KiB = 1024
#: What an ended export may keep whatever its size: its result (with its validated request),
#: the ledger's header (config and manifest steps), and a few markers.
FIXED_BYTES = 6 * KiB
#: What it may keep per layer on top (the ledger's line, the upload's single-flight mark).
PER_LAYER_BYTES = 200
#: Keys that belong to the broker or the workers, not to one export.
FLEET_KEYS = frozenset({"cacheship", "celery", "unacked", "unacked_index", "unacked_mutex"})
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32,64}")


@dataclass(frozen=True)
class Key:
    name: str
    bytes: int
    ttl: int  # seconds; -1: no expiry


@dataclass(frozen=True)
class Footprint:
    """The keys one export created, with their sizes and lifetimes."""

    keys: list[Key]
    short: int  # CACHESHIP_LAYER_RESULTS_EXPIRES of the workers

    def kept(self) -> list[Key]:
        return [k for k in self.keys if k.ttl < 0 or k.ttl > self.short]

    def transient(self) -> list[Key]:
        return [k for k in self.keys if 0 <= k.ttl <= self.short]

    @property
    def kept_bytes(self) -> int:
        return sum(k.bytes for k in self.kept())

    @property
    def transient_bytes(self) -> int:
        return sum(k.bytes for k in self.transient())

    def by_kind(self, keys: Iterable[Key]) -> dict[str, tuple[int, int]]:
        """(count, bytes) per kind of key: its name up to the id or digest."""
        kinds: dict[str, tuple[int, int]] = {}
        for key in keys:
            kind = _kind(key.name)
            count, size = kinds.get(kind, (0, 0))
            kinds[kind] = (count + 1, size + key.bytes)
        return kinds


def bound(layers: int) -> int:
    return FIXED_BYTES + PER_LAYER_BYTES * layers


def _kind(name: str) -> str:
    """A key's name with its id or digest replaced by ``*``."""
    return _ID.sub("*", name)


def _fleet(name: str) -> bool:
    return name in FLEET_KEYS or name.startswith(("_kombu.", "cacheship-worker-"))


def key_names(client: redis.Redis) -> set[str]:
    """Every key but the fleet's (one SCAN)."""
    names = (k.decode() if isinstance(k, bytes) else str(k) for k in client.scan_iter(count=1000))
    return {name for name in names if not _fleet(name)}


def measure(client: redis.Redis, names: Iterable[str], short: int) -> Footprint:
    """Size and lifetime of each key (pipelined); keys gone meanwhile are left out."""
    ordered = sorted(names)
    with client.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.memory_usage(name, samples=0)
            pipe.ttl(name)
        replies = pipe.execute()
    keys = [
        Key(name, int(size), int(ttl))
        for name, size, ttl in zip(ordered, replies[::2], replies[1::2], strict=True)
        if size is not None and int(ttl) != -2
    ]
    return Footprint(keys=keys, short=short)


def settle(client: redis.Redis, before: set[str], short: int, timeout: float = 10.0) -> Footprint:
    """The export's keys once the writes that follow its end are done.

    The chord's body stores its own result after the export's, and its worker then shortens
    it: wait until nothing changes between two looks.
    """
    deadline = time.monotonic() + timeout
    last: list[tuple[str, bool]] | None = None
    while True:
        found = measure(client, key_names(client) - before, short)
        shape = [(k.name, k.ttl < 0 or k.ttl > short) for k in found.keys]
        if shape == last or time.monotonic() > deadline:
            return found
        last = shape
        time.sleep(0.5)


def export_footprint(
    ctx: Context, client: redis.Redis, cache: BenchCache, prefix: str, short: int
) -> tuple[Footprint, dict[str, Any], float]:
    """Export ``cache`` into ``prefix``; (its footprint once ended, its result, seconds)."""
    before = key_names(client)
    seconds, result = ctx.export(cache, prefix)
    return settle(client, before, short), result, seconds


def footprint(ctx: Context) -> list[Row]:
    from bench.scenarios import Row

    assert ctx.cacheship.client is not None
    env = ctx.cacheship.env()
    default = Settings.model_fields["layer_results_expires"].default
    short = int(env.get("CACHESHIP_LAYER_RESULTS_EXPIRES", default))
    client = redis.Redis.from_url(ctx.cacheship.redis.url)
    rows: list[Row] = []
    for count in ctx.sizes.footprint:
        cache = ctx.cache(f"footprint-{count}", [KiB] * count)
        prefix = new_prefix("footprint")
        try:
            for label in ("empty prefix", "every blob present"):
                found, result, seconds = export_footprint(ctx, client, cache, prefix, short)
                want = "layers_uploaded" if label == "empty prefix" else "layers_skipped"
                if result.get(want) != count:
                    raise RuntimeError(f"footprint {count}: expected {want}={count}: {result}")
                kept, transient = found.kept_bytes, found.transient_bytes
                kinds = found.by_kind(found.kept())
                ctx.log(
                    f"  {count} layers, {label}: kept {kept} B ({kept / count:.0f} B/layer), "
                    f"transient {transient} B, {seconds:.2f}s"
                )
                rows.append(
                    Row(
                        scenario=f"11 Redis kept by an ended export, {count} layers, {label}",
                        unit="bytes",
                        cacheship=float(kept),
                        baseline=float(kept + transient),
                        ratio=kept / (kept + transient) if kept + transient else None,
                        target=f"<= {FIXED_BYTES} + {PER_LAYER_BYTES}/layer = {bound(count)}",
                        passed=kept <= bound(count),
                        notes=(
                            f"{kept / count:.0f} B/layer kept for CACHESHIP_RESULT_EXPIRES; "
                            f"baseline = kept + what expires {short}s after the end "
                            f"({transient} B in {len(found.transient())} keys); kept: "
                            + ", ".join(f"{k} ({n}) {b} B" for k, (n, b) in sorted(kinds.items()))
                        ),
                        detail={
                            "layers": count,
                            "kept_bytes": kept,
                            "transient_bytes": transient,
                            "kept_keys": len(found.kept()),
                            "transient_keys": len(found.transient()),
                            "kept_by_kind": kinds,
                            "transient_by_kind": found.by_kind(found.transient()),
                            "seconds": seconds,
                        },
                    )
                )
        finally:
            drop_prefix(ctx.s3, ctx.ours, prefix)
    return rows
