"""What every command shares: one-line errors, exit codes, secret masking, the Redis option."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from tasks.request import LocalSpec, RegistrySpec, S3Spec

#: Exit codes (the README lists them).
EXIT_OK = 0
EXIT_FAILED = 1  # the export failed, the cache is not sound, a server cannot be reached
EXIT_USAGE = 2  # the command line or the request is invalid
EXIT_INTERRUPTED = 130  # Ctrl-C

F = TypeVar("F", bound=Callable[..., Any])

# user:password@ or :password@ in any URL; the password is replaced, the user kept.
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@")
_secrets: set[str] = set()


class CliError(click.ClickException):
    """An error the user can act on; shown as one ``error: ...`` line."""

    exit_code = EXIT_FAILED


class CliUsageError(CliError):
    """The command line or the request is invalid."""

    exit_code = EXIT_USAGE


def remember_secret(value: str | None) -> None:
    """Never show ``value`` in any output (a Redis password found in a URL, for one)."""
    if value and len(value) >= 3:
        _secrets.add(value)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (user names stay: they help debugging)."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def redact(text: str) -> str:
    """Text safe to print: URL passwords masked, remembered secrets replaced."""
    text = mask_url(text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def fail(message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    """Stop with ``error: message`` and exit code 1 (or 2 for EXIT_USAGE)."""
    raise (CliUsageError if exit_code == EXIT_USAGE else CliError)(message)


def redis_option(func: F) -> F:
    """``--redis-url`` (or CACHESHIP_REDIS_URL, or the worker settings' default)."""
    decorator = click.option(
        "--redis-url",
        envvar="CACHESHIP_REDIS_URL",
        show_envvar=True,
        metavar="URL",
        help="Broker and result backend, as the workers use it "
        "[default: the worker settings' redis://127.0.0.1:6379/0].",
    )
    return decorator(func)


def resolve_redis_url(given: str | None) -> str:
    """The URL to use; its password is remembered so that it is never printed."""
    if given is None:
        from tasks.settings import Settings

        given = Settings().redis_url
    match = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:([^@/\s]+)@", given)
    if match:
        remember_secret(match.group(1))
    return given


def check_redis(url: str, timeout: float = 5.0, patience: float = 5.0) -> None:
    """Fail with one line when Redis cannot be reached (Celery would retry for long).

    A refused connection is tried again for ``patience`` seconds: a Redis that restarts
    (a pod rescheduled, an upgrade) is back within that, and a command issued meanwhile
    should not fail for it.
    """
    import redis

    deadline = time.monotonic() + patience
    while True:
        try:
            conn = redis.Redis.from_url(
                url, socket_connect_timeout=timeout, socket_timeout=timeout
            )
            try:
                conn.ping()
            finally:
                conn.close()
            return
        except redis.ConnectionError as exc:
            if time.monotonic() >= deadline:
                fail(f"cannot reach Redis at {mask_url(url)}: {redact(str(exc))}")
            time.sleep(0.25)
        except (redis.RedisError, OSError, ValueError) as exc:
            fail(f"cannot reach Redis at {mask_url(url)}: {redact(str(exc)) or type(exc).__name__}")


def parse_option_spec(text: str, option: str, role: str) -> LocalSpec | S3Spec | RegistrySpec:
    """Parse a ``type=...`` option; errors name the option (``--to: target.bucket: ...``)."""
    from tasks.request import RequestError, parse_spec

    try:
        return parse_spec(text, role)
    except RequestError as exc:
        fail(f"{option}: {exc}", EXIT_USAGE)


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the progress bars show them)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def short_digest(digest: str, length: int = 12) -> str:
    """``sha256:0123456789ab`` (the prefix docker prints)."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:length]}" if hexpart else digest
