"""Where a local cache may be read, and whether a directory looks like one.

Kept apart from the reader (``tasks.backends.local.source``), which needs the cache format codec:
``cacheship export`` checks a source directory before enqueueing, and pays only for these
few path checks, not for importing the codec.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tasks.backends.source import SourceError

ROOTS_SETTING = "CACHESHIP_SOURCE_ROOTS"


def resolve_source_dir(src: str, roots: Sequence[Path]) -> Path:
    """The real directory behind ``src``, refused unless it lies under a configured root.

    Messages name the setting and the roots: the person reading them submitted the export
    and may not know how the workers are configured.
    """
    if not roots:
        raise SourceError(
            f"source.src: local sources are disabled: {ROOTS_SETTING} is empty on the workers "
            "(set it to the directories caches may be read from)"
        )
    path = Path(src)
    if not path.is_absolute():
        raise SourceError(f"source.src: {src!r} must be an absolute path")
    real = Path(os.path.realpath(path))
    if not any(inside(real, Path(os.path.realpath(root))) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        resolved = f" (it resolves to {real})" if str(real) != os.path.normpath(src) else ""
        raise SourceError(
            f"source.src: {src}{resolved} is outside {ROOTS_SETTING} ({allowed}): local "
            "caches are only read under these directories"
        )
    check_layout(real, src)
    return real


def check_layout(directory: Path, src: str | None = None) -> None:
    """Refuse what is not a directory BuildKit wrote with ``--cache-to type=local``.

    Only the presence of ``index.json`` is checked here (its content is read later): enough
    to tell a typo or a wrong directory from a cache, before anything is enqueued or copied.
    """
    shown = src or str(directory)
    if not directory.exists():
        raise SourceError(f"source.src: {shown} does not exist")
    if not directory.is_dir():
        raise SourceError(f"source.src: {shown} is not a directory")
    if not (directory / "index.json").is_file():
        raise SourceError(
            f"source.src: {shown} is not a BuildKit cache: it has no index.json. Expected the "
            "OCI layout (index.json, oci-layout, blobs/sha256/...) that `docker buildx build "
            f"--cache-to type=local,dest={shown}` writes"
        )


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


__all__ = ["ROOTS_SETTING", "check_layout", "inside", "resolve_source_dir"]
