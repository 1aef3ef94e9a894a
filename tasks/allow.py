"""Which servers and buckets a request may name: pure comparisons, no I/O, no settings.

A request that names a host steers where the workers send requests signed with the
fleet's credentials, so a host is accepted only when it is, after normalisation, one the
operator listed. Normalising is strict on purpose: a URL is accepted only as
``scheme://host[:port][/]``. Anything else (user info, a path, a query, percent-escapes,
backslashes, non-ASCII, the numeric IPv4 spellings ``getaddrinfo`` accepts) is refused
rather than interpreted, because the bypasses people try all live in the differences
between the parser that checks a URL and the one that connects.

Both S3 endpoints and registry hosts use this module: ``origin``/``endpoint_allowed`` for
URLs, ``host_origin`` for ``host[:port]`` names without a scheme.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

DEFAULT_PORTS = {"http": 80, "https": 443}

_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.S
)
_AUTHORITY = re.compile(r"(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>[0-9]*))?")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


class URLRefused(ValueError):
    """Not a plain ``scheme://host[:port]``; the message says what is wrong (never why not)."""


class Origin(NamedTuple):
    """Where requests go: the only parts of an endpoint that matter for the allow-list."""

    scheme: str
    host: str  # lower case; IPv6 in compressed form, without brackets
    port: int

    def url(self) -> str:
        """The canonical URL: what the worker connects to once the origin is allowed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def normalise_host(host: str) -> str:
    """A host name or IP literal in its one canonical spelling, or ``URLRefused``.

    A trailing dot is kept: ``minio.`` is the absolute name, ``minio`` may be completed
    with the resolver's search domains, so they can be different servers.
    """
    if not host:
        raise URLRefused("has no host")
    if not host.isascii():
        raise URLRefused("host must be ASCII (write an international name in its xn-- form)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise URLRefused("IPv6 host must be in [brackets]")
        literal = host[1:-1]
        if "%" in literal:
            raise URLRefused("IPv6 zone identifiers are not accepted")
        try:
            return ipaddress.IPv6Address(literal).compressed
        except ValueError:
            raise URLRefused("is not a valid IPv6 address") from None
    name = host.lower()
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # getaddrinfo reads 127.1, 2130706433 and 0x7f.0.0.1 as IPv4 addresses: only the
        # canonical dotted quad is compared, every other numeric spelling is refused.
        try:
            address = ipaddress.IPv4Address(name)
        except ValueError:
            raise URLRefused("numeric host must be a dotted-quad IPv4 address") from None
        if str(address) != name:
            raise URLRefused("numeric host must be a dotted-quad IPv4 address") from None
        return name
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise URLRefused("host must be letters, digits, '-', '_' and '.' only")
    return name


def _port(text: str | None, default: int | None) -> int:
    if text is None or text == "":
        if text == "":
            raise URLRefused("has an empty port")
        if default is None:
            raise URLRefused("needs a port")
        return default
    port = int(text)
    if not 1 <= port <= 65535:
        raise URLRefused("port must be 1-65535")
    return port


def origin(url: str) -> Origin:
    """The scheme, host and port of an ``http(s)://host[:port][/]`` URL, or ``URLRefused``."""
    match = _URL.fullmatch(url.strip())
    if match is None:
        raise URLRefused("must be an http:// or https:// URL")
    scheme = match["scheme"].lower()
    if scheme not in DEFAULT_PORTS:
        raise URLRefused("must be an http:// or https:// URL")
    authority, rest = match["authority"], match["rest"]
    if "@" in authority:
        raise URLRefused("must not contain user info (user@)")
    if rest not in ("", "/"):
        raise URLRefused("must be scheme://host[:port] without a path, query or fragment")
    if "%" in authority or "\\" in authority:
        raise URLRefused("host must not contain '%' escapes or backslashes")
    parts = _AUTHORITY.fullmatch(authority)
    if parts is None:
        raise URLRefused("host[:port] is malformed")
    host = normalise_host(parts["host"])
    return Origin(scheme, host, _port(parts["port"], DEFAULT_PORTS[scheme]))


def host_origin(text: str, scheme: str = "https") -> Origin:
    """``host[:port]`` without a scheme (a registry's name), with ``scheme``'s default port."""
    if "/" in text or "@" in text:
        raise URLRefused("must be host[:port]")
    return origin(f"{scheme}://{text}")


def origins(urls: Iterable[str]) -> frozenset[Origin]:
    """The origins of a list of URLs (an operator's setting); the first bad one is refused."""
    found = set()
    for url in urls:
        try:
            found.add(origin(url))
        except URLRefused as exc:
            raise URLRefused(f"{url!r}: {exc}") from None
    return frozenset(found)


def endpoint_allowed(url: str, allowed: frozenset[Origin]) -> Origin | None:
    """The allowed origin ``url`` names, or None (unlisted, or not a plain URL at all)."""
    try:
        found = origin(url)
    except URLRefused:
        return None
    return found if found in allowed else None


def bucket_readable(bucket: str, writable: Iterable[str], readable: Iterable[str]) -> bool:
    """Sources: a bucket in either list, or any bucket when no list names one."""
    write_list, read_list = frozenset(writable), frozenset(readable)
    return not write_list or bucket in write_list or bucket in read_list


def bucket_writable(bucket: str, writable: Iterable[str], readable: Iterable[str]) -> bool:
    """Targets (and prunes): never a read-only bucket; else listed, or any when none is."""
    write_list = frozenset(writable)
    if bucket in frozenset(readable):
        return False
    return not write_list or bucket in write_list
