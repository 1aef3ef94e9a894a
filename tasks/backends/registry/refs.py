"""Image references, normalised the way docker and BuildKit normalise them.

``app`` is ``docker.io/library/app:latest``, ``ghcr.io/org/app`` is ``ghcr.io/org/app:latest``,
``host:5000/a/b@sha256:...`` is pinned by digest. The first path component is a registry
host only when it holds a ``.`` or a ``:`` or is ``localhost`` (docker's rule); otherwise the
reference is on Docker Hub. Plain Python, no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DOCKER_HUB: Final = "docker.io"
#: Where Docker Hub's registry API answers (docker.io itself is a website).
DOCKER_HUB_ENDPOINT: Final = "registry-1.docker.io"
DEFAULT_TAG: Final = "latest"
MAX_NAME_LENGTH: Final = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class InvalidReferenceError(ValueError):
    """Not a reference docker would accept; the message says which part is wrong."""


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``host/repository`` with a tag, a digest, or both."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """``host/repository``: what the allow-list and messages speak of."""
        return f"{self.host}/{self.repository}"

    @property
    def endpoint_host(self) -> str:
        """The host the registry API is reached at (Docker Hub's differs from its name)."""
        return DOCKER_HUB_ENDPOINT if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def split_host(name: str) -> tuple[str, str]:
    """docker's ``splitDockerDomain``: the registry host and the repository path."""
    first, sep, rest = name.partition("/")
    if not sep or (
        "." not in first and ":" not in first and first != "localhost" and first.lower() == first
    ):
        host, path = DOCKER_HUB, name
    else:
        host, path = first, rest
    if host == "index.docker.io":
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return host, path


def parse_reference(text: str) -> Reference:
    """Normalise ``text`` (docker's ``ParseNormalizedNamed`` + ``TagNameOnly``).

    No tag and no digest means ``latest``; both may be given (the digest then decides).
    """
    value = text.strip()
    if not value:
        raise InvalidReferenceError("empty reference")
    if any(ch.isspace() for ch in value) or "://" in value:
        raise InvalidReferenceError(f"{value[:80]!r} is not a reference like host/repository:tag")
    digest = None
    if "@" in value:
        value, _, digest = value.partition("@")
        if not _DIGEST.match(digest):
            raise InvalidReferenceError(
                f"digest {digest[:80]!r} is not sha256: followed by 64 lower-case hex digits"
            )
    tag = None
    slash = value.rfind("/")
    colon = value.rfind(":")
    if colon > slash:
        value, tag = value[:colon], value[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReferenceError(
                f"tag {tag[:80]!r} is not valid (up to 128 of A-Z a-z 0-9 _ . -, not "
                "starting with . or -)"
            )
    host, path = split_host(value)
    if not _HOST.match(host):
        raise InvalidReferenceError(f"registry host {host[:80]!r} is not a valid host[:port]")
    if path.lower() != path:
        raise InvalidReferenceError(f"repository {path[:80]!r} must be lower-case")
    if not _PATH.match(path):
        raise InvalidReferenceError(
            f"repository {path[:80]!r} is not valid (lower-case components of a-z 0-9 "
            "separated by . _ __ - and /)"
        )
    if len(f"{host}/{path}") > MAX_NAME_LENGTH:
        raise InvalidReferenceError(f"repository name is longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(host, path, tag, digest)
