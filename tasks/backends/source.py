"""What every source returns, and the error every source raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line imports SourceError without the codec
    from tasks.cacheformat import CacheConfig, Descriptor

# BuildKit refuses bigger manifests and configs in its content importer; a source reads at
# most this much of one, so a hostile file cannot exhaust a worker's memory.
MAX_METADATA_BYTES = 64 * 1024 * 1024


#: The setting that bounds a cache's layers (Settings.max_layers).
MAX_LAYERS_SETTING = "CACHESHIP_MAX_LAYERS"


class SourceError(ValueError):
    """The source cannot be read as a BuildKit cache; the message says which part and why."""


def check_layer_count(count: int, max_layers: int | None) -> None:
    """Refuse a cache with more layers than a worker plans for (every layer is a task, a
    step in the progress record and a Flower row: memory and Redis grow with them)."""
    if max_layers is not None and count > max_layers:
        raise SourceError(
            f"source: the cache has {count} layers, more than {MAX_LAYERS_SETTING} "
            f"({max_layers}); nothing was copied"
        )


class MissingBlobError(SourceError):
    """A blob the cache references is not in the source: permanent, never retried."""


@dataclass(frozen=True)
class LoadedCache:
    """A cache as read from its source, before it is parsed into a graph."""

    config: CacheConfig
    descriptors: Mapping[str, Descriptor]
    #: The manifest and config blobs read (content layouts only; verify checks their sizes).
    manifest: Descriptor | None = None
    config_desc: Descriptor | None = None
