"""The operator's list of registries workers may reach (``CACHESHIP_ALLOWED_REGISTRIES``).

Each entry is a glob: without a ``/`` it matches the registry host (``ghcr.io``,
``registry.internal:5000``, ``*.dkr.ecr.*.amazonaws.com``); with one it matches
``host/repository`` (``ghcr.io/acme/*``). An empty list allows no registry: a worker never
connects to a host nobody listed. Checked on the worker, before any connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from tasks.backends.registry.refs import Reference
from tasks.request import RequestError

SETTING = "CACHESHIP_ALLOWED_REGISTRIES"


class RegistryNotAllowedError(RequestError):
    """The reference's registry or repository is not on the operator's list."""


def registry_allowed(ref: Reference, patterns: Sequence[str]) -> bool:
    """Whether an entry of ``patterns`` lists the reference's host or repository."""
    for pattern in patterns:
        subject = ref.name if "/" in pattern else ref.host
        if fnmatchcase(subject, pattern):
            return True
    return False


def check_registry_allowed(ref: Reference, patterns: Sequence[str], role: str) -> None:
    """Refuse (naming the field and the setting) a registry the operator did not list."""
    if not patterns:
        raise RegistryNotAllowedError(
            f"{role}.ref: registries are disabled on the workers: {SETTING} is empty (list "
            "the registry hosts or host/repository globs caches may be copied to or from)"
        )
    if not registry_allowed(ref, patterns):
        raise RegistryNotAllowedError(
            f"{role}.ref: {ref.name} is not in {SETTING} on the workers"
        )
