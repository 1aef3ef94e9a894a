"""The two errors of the format layer.

Every problem with a cache config, a manifest or a graph is a :class:`FormatError` whose text
is one line that names the place (``records[3].inputs[0][1].link: invalid record ID: 11``):
the CLI prints it as is and the export task reports it to the build farm, so it must make
sense without a traceback.
"""

from __future__ import annotations


class FormatError(ValueError):
    """A cache config, manifest or graph that BuildKit would refuse (or that we refuse first).

    ``where`` is the JSON path of the offending value (empty when the whole document is at
    fault) and ``reason`` the bare message; ``str(error)`` joins them.
    """

    def __init__(self, reason: str, where: str = "") -> None:
        reason = one_line(reason)
        self.reason = reason
        self.where = where
        super().__init__(f"{where}: {reason}" if where else reason)


class EmptyCacheError(FormatError):
    """The graph holds no layer at all: BuildKit skips such an export, and so do we."""

    def __init__(self) -> None:
        super().__init__("nothing to export: the cache has no layers")


def one_line(text: str) -> str:
    """Keep messages on one line whatever the input contained."""
    if "\n" in text or "\r" in text:
        text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text


def show(value: object, limit: int = 80) -> str:
    """A short, printable rendering of a user-supplied value for an error message."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
