"""Pausing Python's cyclic garbage collector while a large cache is read or written.

Reading a config of 100,000 records allocates millions of small objects that all stay
alive; each allocation burst makes the collector traverse everything allocated so far,
which costs about as much again as the work itself. Nothing here creates garbage cycles
worth collecting early, so collection waits until the outermost pause ends. A counter
(under a lock) makes nested and concurrent pauses safe: the collector is switched back on
only when the last pause ends, and only if it was on before the first.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off (reference counting still frees memory)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
