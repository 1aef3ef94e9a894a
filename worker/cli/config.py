"""``cacheship config ...``: offline tools for cache configs (filled in by the format layer)."""

from __future__ import annotations

import sys
from typing import BinaryIO

import click


@click.group()
def config() -> None:
    """Work with BuildKit cache configs."""


def _read(name: str, stdin: BinaryIO) -> bytes:
    if name == "-":
        return stdin.read()
    with open(name, "rb") as handle:
        return handle.read()


def _error_line(name: str, message: str) -> bytes:
    label = "<stdin>" if name == "-" else name
    text = f"error: {label}: {message}"
    return text.replace("\r", "\\r").replace("\n", "\\n").encode("utf-8", "backslashreplace")


@config.command("normalize")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=True, allow_dash=True))
@click.pass_context
def normalize_command(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Print each config as BuildKit would re-export it, one line per FILE.

    A FILE is a config as BuildKit's S3 importer reads it (layer descriptors from the
    layers' annotations); ``-`` or no FILE reads standard input. Each input gives one line:
    the canonical config JSON, or ``error: FILE: <what is wrong>``. The exit status is 0
    when every input was valid, 2 otherwise.
    """
    from tasks.cacheformat import FormatError, normalize

    debug = bool((ctx.find_root().obj or {}).get("debug"))
    stdin = sys.stdin.buffer
    stdout = sys.stdout.buffer
    failed = False
    for name in files or ("-",):
        try:
            line = normalize(_read(name, stdin))
        except FormatError as error:
            line, failed = _error_line(name, str(error)), True
        except OSError as error:
            line, failed = _error_line(name, error.strerror or str(error)), True
        except Exception as error:  # no traceback for the user, whatever happened
            if debug:
                raise
            reason = f"internal error: {type(error).__name__}: {error}"
            line, failed = _error_line(name, reason), True
        stdout.write(line + b"\n")
    stdout.flush()
    ctx.exit(2 if failed else 0)
