"""Where an export writes: one small interface per target, as BuildKit's exporters have.

The tasks only ever talk to a ``Target``: copy a layer into it, tell which layers it lacks,
store a small blob, write the names. Each backend (``tasks/backends/<name>/target.py``)
implements the same calls; what they return (``CopyOutcome``, ``NameWrite``) and the errors
the tasks tell apart (``DigestMismatchError``, ``NameWriteError``...) are defined here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol

from tasks.cacheformat import Descriptor, GoTime
from tasks.cacheformat.merge import MergeCounts
from tasks.plan import ExportPlan

Action = Literal["uploaded", "skipped", "touched", "mounted"]


@dataclass(frozen=True)
class CopyOutcome:
    """What happened to one blob; ``bytes_sent`` excludes parts resumed from a previous try."""

    digest: str
    size: int
    action: Action
    bytes_sent: int = 0
    bytes_resumed: int = 0


class IngestError(Exception):
    """A blob could not be stored; the message names the digest."""


class DigestMismatchError(IngestError):
    """The bytes were not the ones the descriptor promised: permanent, never retried."""


class NameWriteError(Exception):
    """A name could not be written; the message names it."""


class InvalidStoredConfigError(NameWriteError):
    """The name holds something that is not a cache config BuildKit could read."""


@dataclass(frozen=True)
class NameWrite:
    """What happened to one name."""

    name: str
    key: str
    merged: bool
    counts: MergeCounts | None = None
    conditional: bool = False  # whether the store checked the condition
    attempts: int = 1
    replaced_invalid: bool = False
    note: str = ""  # why the write was not conditional, when the store does not check

    @property
    def guard(self) -> str:
        """What kept concurrent merges from losing each other's records."""
        return "fleet lock and conditional write" if self.conditional else "fleet lock only"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "key": self.key, "merged": self.merged}
        if self.merged:
            out.update(
                conditional=self.conditional,
                guard=self.guard,
                attempts=self.attempts,
                replaced_invalid=self.replaced_invalid,
            )
            if self.note:
                out["note"] = self.note
            if self.counts is not None:
                out.update(self.counts.to_json())
        return out


def now_go() -> GoTime:
    """The wall clock as a Go time (what ``max_age`` counts back from)."""
    ns = time.time_ns()
    return GoTime(ns // 1_000_000_000, ns % 1_000_000_000)


class IncompleteCacheError(Exception):
    """A planned layer is not in the bucket: the names are not written."""


OpenSource = Callable[[], AbstractContextManager[BinaryIO]]


class Target(Protocol):
    """The ingester role of an export: blobs in, then names that reference them."""

    def copy_layer(
        self,
        layer: Descriptor,
        open_source: OpenSource,
        progress: Callable[[int], None],
        known_absent: bool = False,
    ) -> CopyOutcome:
        """Make the target hold ``layer`` byte for byte; safe to run any number of times.

        ``known_absent``: a HEAD just found no blob (``survey``); do not ask again.
        """
        ...

    def missing(self, layers: Sequence[Descriptor]) -> list[str]:
        """Digests of ``layers`` the target lacks (absent, or of the wrong size)."""
        ...

    def survey(self, layers: Sequence[Descriptor], parallelism: int = 16) -> dict[str, bool]:
        """Digest -> True when stored as it is (nothing to do), False when absent."""
        ...

    def put_blob(self, desc: Descriptor, data: bytes) -> None:
        """Store a small blob (config, manifest) under its digest."""
        ...

    def write_names(
        self, plan: ExportPlan, on_name: Callable[[NameWrite], None] = lambda write: None
    ) -> list[NameWrite]:
        """Point the cache's names at the plan (overwrite, or merge into what they hold);
        called only once every blob is stored."""
        ...

    def abandon(self, digest: str) -> None:
        """Leave nothing half-written for ``digest`` (the layer will not be retried)."""
        ...
