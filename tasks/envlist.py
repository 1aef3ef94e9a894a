"""Lists in settings (``a,b`` or ``a:b``), readable without building the settings model.

The command line checks local sources against ``CACHESHIP_SOURCE_ROOTS`` before it
enqueues; reading one variable this way keeps pydantic-settings out of its start-up.
"""

from __future__ import annotations

import os
from pathlib import Path


def split_list(value: object) -> object:
    """Accept ``a,b`` or ``a:b`` lists from the environment as well as real lists."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(":", ",").split(",")]
        return [p for p in parts if p]
    return value


def env_paths(name: str) -> list[Path]:
    """The directories a list setting names in the environment (none when unset)."""
    parts = split_list(os.environ.get(name, ""))
    return [Path(p) for p in parts] if isinstance(parts, list) else []
