"""Content digests, as the cache format uses them.

BuildKit writes only ``sha256`` digests for blobs, diffIDs and cache keys; anything else in a
config is either damage or a registry we cannot serve, so it is refused up front with the
location of the value rather than discovered half-way through an upload.
"""

from __future__ import annotations

import hashlib
import re

from tasks.cacheformat.errors import FormatError, show

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_ALGORITHM = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):")

#: Prefix of the cache keys BuildKit gives to vertices whose result must never be reused.
RANDOM_PREFIX = "random:"


def is_sha256(value: str) -> bool:
    """True for ``sha256:`` followed by 64 lower-case hex digits."""
    return _SHA256.fullmatch(value) is not None


def check_digest(value: object, where: str) -> str:
    """Return ``value`` when it is a sha256 digest, else raise a FormatError naming ``where``."""
    if type(value) is str and _SHA256.fullmatch(value) is not None:
        return value
    raise FormatError(digest_problem(value), where)


def digest_problem(value: object) -> str:
    """Explain why ``value`` is not an acceptable digest."""
    if type(value) is not str:
        return f"digest must be a string, got {show(value)}"
    match = _ALGORITHM.match(value)
    if match is not None and match.group(1) != "sha256":
        return (
            f"digest algorithm {match.group(1)!r} is not supported (only sha256 is): {show(value)}"
        )
    return f"digest must be sha256:<64 lower-case hex>, got {show(value)}"


def check_record_digest(value: object, where: str) -> str:
    """A record's cache key: a sha256 digest, or a ``random:`` key that BuildKit ignores."""
    if type(value) is str and (
        _SHA256.fullmatch(value) is not None
        or (value.startswith(RANDOM_PREFIX) and len(value) > len(RANDOM_PREFIX))
    ):
        return value
    if type(value) is str and value == "":
        raise FormatError("record has no digest", where)
    if value == RANDOM_PREFIX:
        raise FormatError("random: digest without a key", where)
    raise FormatError(digest_problem(value), where)


def sha256_digest(data: bytes) -> str:
    """The digest of ``data`` in ``sha256:<hex>`` form."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
