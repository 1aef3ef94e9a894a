"""Refusals are one WARNING line in the worker's log; tracebacks are kept for bugs.

A task that refuses an export (a request the settings forbid, a source that is not a cache,
bytes that do not match their digest) raises one of the tasks' known exceptions. Celery logs
every such failure as ``raised unexpected`` at ERROR with a traceback, and the chord logs the
same failure again for the final task: an operator reading the log cannot tell a refused
export from a bug. This filter rewrites those records (Celery's own loggers, nothing in the
task code) into ``<task>[<id>] refused: <message>`` at WARNING, without the traceback.

Exceptions are recognised by class name (anywhere in their class hierarchy), so the filter
does not import the task modules and keeps working when they move.
"""

from __future__ import annotations

import logging
from typing import Any

#: The tasks' exceptions for "this export cannot be done as asked" (not for bugs).
REFUSAL_NAMES = frozenset({"ExportFailed", "RequestError", "SourceError"})
#: Errors behind a refusal that are answers, not bugs: bad input, a source that is not a
#: cache, bytes that do not match, S3 saying no. Anything else behind an ``ExportFailed``
#: (a ``KeyError``, a ``TypeError``) is a bug and keeps its traceback.
_ANSWER_NAMES = REFUSAL_NAMES | {
    "FormatError",
    "IngestError",
    "DigestMismatchError",
    "IncompleteCacheError",
    "ClientError",
    "BotoCoreError",
}
#: What the chord writes when a layer task failed with one of them.
_CHORD_MARKERS = tuple(f"raised {name}(" for name in REFUSAL_NAMES)
#: Celery's loggers that report task and chord failures.
LOGGERS = ("celery.app.trace", "celery.backends.redis", "celery.backends.base")


def _named(exc: BaseException, names: frozenset[str] | set[str]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def is_refusal(exc: BaseException | None) -> bool:
    """True for the tasks' known refusals, also when a chord error carries one."""
    if exc is None:
        return False
    if type(exc).__name__ == "ChordError":
        return any(marker in str(exc) for marker in _CHORD_MARKERS)
    return _named(exc, REFUSAL_NAMES)


def bug_behind(exc: BaseException) -> BaseException | None:
    """The unexpected error a refusal was raised from (``raise ExportFailed(...) from None``
    keeps it as the context), or None when it is an ordinary answer."""
    context = exc.__cause__ or exc.__context__
    if context is None or _named(context, _ANSWER_NAMES):
        return None
    return context


def refusal_text(exc: BaseException) -> str:
    """The refusal's own message (a chord error's is unwrapped to the layer's)."""
    text = str(exc)
    for marker in _CHORD_MARKERS:
        if marker in text:
            return text.split(marker, 1)[1].rstrip(")").strip("'\"")
    return text


class RefusalFilter(logging.Filter):
    """Turns a logged refusal into one WARNING line; leaves every other record alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not is_refusal(exc):
            return True
        bug = bug_behind(exc)
        if bug is not None:
            # Keep the ERROR, with the traceback that matters: the bug's, not the wrapper's.
            record.exc_info = (type(bug), bug, bug.__traceback__)
            record.exc_text = None
            return True
        data: Any = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("id"):
            where = f"{data.get('name', 'task')}[{data['id']}]"
        else:
            where = "chord"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "%s refused: %s", (where, refusal_text(exc))
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


_FILTER = RefusalFilter()


def install() -> None:
    """Attach the filter to Celery's loggers (idempotent; forked pool processes inherit it)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


install()
