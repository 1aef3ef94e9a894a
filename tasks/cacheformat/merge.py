"""Merging a new export into the config already stored under a cache name.

BuildKit's S3 exporter overwrites a name: when many builds of one branch export to it at
once, only the last one is kept. Merging instead keeps both, with the graph's own rules:
the merged config is what BuildKit's ``ParseConfig`` + ``Marshal`` make of one config
holding the stored records and layers followed by the new export's (indexes renumbered),
so records with the same digest and inputs become one node and results de-duplicate
exactly as they do when BuildKit imports both caches.

Three things may then be dropped, each counted in :class:`MergeCounts`:

- results whose layers are gone from the bucket (the caller says which blobs are missing;
  the parser drops such results as BuildKit's importer would);
- results older than ``max_age`` (bounds, :class:`MergeLimits`);
- the oldest results while the config holds more than ``max_records`` records.

When anything is dropped, records that then lead to no result (no result of their own and
no record built on them that has one) go too, and the config is normalised again, so the
stored bytes are a fixed point of the normaliser (except where one blob sits under several
parents: BuildKit orders those layers by their index in its input, so neither its output
nor ours is a fixed point there). Results that came with the new
export (by record digest) are never dropped for age or count: the name always serves the
latest build, even when that alone is over ``max_records``.

Plain Python: no S3, no Redis (``tasks.backends.s3.names`` does the reading and writing).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Final

from tasks.cacheformat.config import (
    CacheConfig,
    CacheInput,
    CacheLayer,
    CacheRecord,
    decode_config,
    descriptors_from_annotations,
)
from tasks.cacheformat.descriptor import Descriptor
from tasks.cacheformat.gcpause import paused_gc
from tasks.cacheformat.gotime import GoTime
from tasks.cacheformat.graph import parse_graph
from tasks.cacheformat.marshal import Marshalled, marshal, s3_config_bytes

#: A merged name holds at most this many records unless the request says otherwise.
DEFAULT_MAX_RECORDS: Final = 20_000


@dataclass(frozen=True)
class MergeLimits:
    """How large a merged name may grow: records, and age of results in seconds (None: any)."""

    max_records: int = DEFAULT_MAX_RECORDS
    max_age: float | None = None


@dataclass(frozen=True)
class MergeCounts:
    """What a merge did, for progress and the export's result."""

    records_existing: int  # records in the stored config, as stored
    records_new: int  # records in the new export's config
    records_merged: int  # after parse + marshal of both, before anything was dropped
    records_after: int  # in the config written
    layers_after: int
    results_missing: int  # stored results whose layers are gone from the bucket
    results_expired: int  # dropped for max_age
    results_over_limit: int  # dropped, oldest first, for max_records
    records_pruned: int  # records dropped because they no longer lead to any result

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Merged:
    """The config to write under the name (S3 form) and what it references."""

    s3_config: bytes
    marshalled: Marshalled
    counts: MergeCounts

    @property
    def layers(self) -> list[Descriptor]:
        return self.marshalled.layers


def read_stored(data: bytes) -> CacheConfig:
    """Read a stored name as BuildKit's S3 importer would; FormatError when it would refuse it.

    Parsing the graph here too means a config whose records loop or link out of range is
    refused before the merge, not half-way through it.
    """
    with paused_gc():
        cfg = decode_config(data)
        parse_graph(cfg, descriptors_from_annotations(cfg))
    return cfg


def stored_blobs(existing: CacheConfig, new: CacheConfig) -> list[Descriptor]:
    """Layers of the stored config that the new export does not carry: the ones to HEAD."""
    fresh = {layer.blob for layer in new.layers}
    by_blob = descriptors_from_annotations(existing)
    return [d for blob, d in by_blob.items() if blob not in fresh]


def concatenate(first: CacheConfig, second: CacheConfig) -> CacheConfig:
    """One config: ``first``'s layers and records, then ``second``'s, indexes renumbered.

    An index that is already invalid (negative) stays invalid, so that concatenation never
    turns a broken reference into a valid one.
    """
    layer_shift, record_shift = len(first.layers), len(first.records)

    def layer_index(index: int) -> int:
        return index + layer_shift if index >= 0 else index

    layers = [layer._replace(parent=layer_index(layer.parent)) for layer in second.layers]
    records = [
        CacheRecord(
            record.digest,
            tuple(
                tuple(
                    CacheInput(i.selector, i.link + record_shift if i.link >= 0 else i.link)
                    for i in slot
                )
                for slot in record.inputs
            ),
            tuple(r._replace(layer=layer_index(r.layer)) for r in record.results),
            tuple(c._replace(layers=tuple(map(layer_index, c.layers))) for c in record.chains),
        )
        for record in second.records
    ]
    return CacheConfig(first.layers + tuple(layers), first.records + tuple(records))


def merge_configs(
    existing: CacheConfig | None,
    new: CacheConfig,
    *,
    now: GoTime,
    limits: MergeLimits | None = None,
    missing: Collection[str] = frozenset(),
) -> Merged:
    """Merge ``new`` into ``existing`` (None: nothing stored yet) and bound the result.

    ``missing`` holds blob digests known to be absent from the bucket; blobs of ``new`` are
    never missing (the export stored them). ``now`` is the wall clock ``max_age`` counts
    back from. Raises FormatError only for what ``new`` itself gets wrong (``existing``
    comes through :func:`read_stored`).
    """
    limits = limits or MergeLimits()
    base = existing or CacheConfig()
    fresh = {layer.blob for layer in new.layers}
    gone = frozenset(missing) - fresh
    with paused_gc():
        combined = concatenate(base, new)
        descriptors = descriptors_from_annotations(combined)
        for blob in gone:
            descriptors.pop(blob, None)
        merged = marshal(parse_graph(combined, descriptors), allow_empty=True)
        del combined
        results_missing = _results_touching(base, gone) if gone else 0
        protected = _keys_with_results(new)
        pruned = _Pruner(merged.config, protected)
        expired = 0
        if limits.max_age is not None:
            expired = pruned.drop_older_than(_minus(now, limits.max_age))
        over = pruned.drop_oldest_until(limits.max_records)
        final = merged
        if pruned.changed or results_missing:
            pruned.collect()
            final = marshal(parse_graph(pruned.config(), merged.descriptors()), allow_empty=True)
        s3_config = s3_config_bytes(final)
    counts = MergeCounts(
        records_existing=len(base.records),
        records_new=len(new.records),
        records_merged=len(merged.config.records),
        records_after=len(final.config.records),
        layers_after=len(final.layers),
        results_missing=results_missing,
        results_expired=expired,
        results_over_limit=over,
        records_pruned=pruned.pruned,
    )
    return Merged(s3_config, final, counts)


def _minus(now: GoTime, seconds: float) -> GoTime:
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    sec, nsec = now.unix_seconds - whole, now.nanosecond - nanos
    if nsec < 0:
        sec, nsec = sec - 1, nsec + 1_000_000_000
    return GoTime(sec, nsec)


def _keys_with_results(cfg: CacheConfig) -> set[str]:
    """Digests of the records that carry a result in ``cfg`` (what the new export brings).

    By digest, not by result: a merged node keeps only its newest result, which may be a
    stored one equivalent to the new export's; that one must stay all the same.
    """
    return {record.digest for record in cfg.records if record.results or record.chains}


def _results_touching(cfg: CacheConfig, gone: frozenset[str]) -> int:
    """How many results of ``cfg`` use a blob in ``gone`` (the parser will drop them)."""
    layers = cfg.layers
    memo: dict[int, bool] = {}

    def uses_gone(index: int) -> bool:
        path = []
        verdict = False
        while 0 <= index < len(layers) and index not in memo and index not in path:
            path.append(index)
            if layers[index].blob in gone:
                verdict = True
                break
            index = layers[index].parent
        else:
            verdict = memo.get(index, False)
        for seen in path:
            memo[seen] = verdict
        return verdict

    count = 0
    for record in cfg.records:
        count += sum(uses_gone(r.layer) for r in record.results)
        count += sum(
            any(0 <= i < len(layers) and layers[i].blob in gone for i in c.layers)
            for c in record.chains
        )
    return count


class _Pruner:
    """Drops results from a normalised config, and the records that then lead to nothing.

    A record is needed while it has a result or a needed record links to it; counts of
    needed links make every removal cost only the links it touches.
    """

    def __init__(self, cfg: CacheConfig, protected: set[str]) -> None:
        self._cfg = cfg
        records = cfg.records
        self._has_result = [bool(r.results) for r in records]
        self._alive = [True] * len(records)
        self._alive_count = len(records)
        self._needed_by = [0] * len(records)
        for record in records:
            for slot in record.inputs:
                for link in slot:
                    self._needed_by[link.link] += 1
        self._queue = sorted(
            (r.results[0].created_at, index)
            for index, r in enumerate(records)
            if r.results and r.digest not in protected
        )
        heapq.heapify(self._queue)
        self.changed = False
        self.pruned = 0

    def _drop_result(self, index: int) -> None:
        self._has_result[index] = False
        self.changed = True
        self._release(index)

    def _release(self, start: int) -> None:
        records = self._cfg.records
        stack = [start]
        while stack:
            index = stack.pop()
            if not self._alive[index] or self._has_result[index] or self._needed_by[index]:
                continue
            self._alive[index] = False
            self._alive_count -= 1
            self.pruned += 1
            self.changed = True
            for slot in records[index].inputs:
                for link in slot:
                    self._needed_by[link.link] -= 1
                    stack.append(link.link)

    def collect(self) -> None:
        """Drop every record that leads to no result (also ones that never had any)."""
        for index in range(len(self._alive)):
            self._release(index)

    def drop_older_than(self, cutoff: GoTime) -> int:
        dropped = 0
        while self._queue and self._queue[0][0] < cutoff:
            _, index = heapq.heappop(self._queue)
            self._drop_result(index)
            dropped += 1
        return dropped

    def drop_oldest_until(self, max_records: int) -> int:
        if self._alive_count <= max_records:
            return 0
        self.collect()  # records leading to nothing go first: they cost no result
        dropped = 0
        while self._alive_count > max_records and self._queue:
            _, index = heapq.heappop(self._queue)
            self._drop_result(index)
            dropped += 1
        return dropped

    def config(self) -> CacheConfig:
        """The records still alive, renumbered, with the same layers (marshal trims them)."""
        records = self._cfg.records
        new_index: dict[int, int] = {}
        kept: list[CacheRecord] = []
        for index, record in enumerate(records):
            if self._alive[index]:
                new_index[index] = len(kept)
                kept.append(record)
        out = []
        for index, record in zip(new_index, kept, strict=True):
            out.append(
                CacheRecord(
                    record.digest,
                    tuple(
                        tuple(CacheInput(i.selector, new_index[i.link]) for i in slot)
                        for slot in record.inputs
                    ),
                    record.results if self._has_result[index] else (),
                )
            )
        layers: tuple[CacheLayer, ...] = self._cfg.layers
        return CacheConfig(layers, tuple(out))
