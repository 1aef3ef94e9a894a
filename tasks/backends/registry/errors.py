"""What fails at a registry, and BuildKit's 1 MiB limit on what its importer reads.

Kept apart from the HTTP client: the tasks name these errors and check the limit in every
worker process, and importing httpx (the client's library) costs each of them about 6 MiB
that a worker which never talks to a registry need not carry.
"""

from __future__ import annotations

from tasks.backends.target import NameWriteError
from tasks.cacheformat import MAX_IMPORT_BLOB_SIZE, Descriptor


class RegistryError(Exception):
    """A registry request that failed; the message names the registry and the operation."""

    transient = False

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class TransientRegistryError(RegistryError):
    """Worth retrying later: 5xx, 429, a broken connection, a forgotten upload session."""

    transient = True


class PermanentRegistryError(RegistryError):
    """Retrying will not help: refused credentials, unknown names, invalid content."""


class RegistryAuthError(PermanentRegistryError):
    """401 or 403: no or wrong credentials, or no right to this repository."""


class RegistryNotFoundError(PermanentRegistryError):
    """404 on a manifest or blob the request needs."""


class CacheTooLargeError(NameWriteError):
    """A manifest or config over what BuildKit's registry importer reads."""


def too_large(what: str, desc: Descriptor) -> str | None:
    """The refusal for one document over BuildKit's 1 MiB limit, with the remedies."""
    if desc.size <= MAX_IMPORT_BLOB_SIZE:
        return None
    return (
        f"cache {what} {desc.digest} is {desc.size} bytes, over the {MAX_IMPORT_BLOB_SIZE} "
        "bytes (1 MiB) BuildKit's registry importer reads (it would refuse the cache); "
        "nothing was written. Remedies: export the build with mode=min, or merge=true with "
        "max_records=N (and max_age) to bound the records kept; type=s3 has no such limit"
    )


def check_import_limits(config: Descriptor, manifest: Descriptor) -> None:
    for what, desc in (("config", config), ("manifest", manifest)):
        message = too_large(what, desc)
        if message is not None:
            raise CacheTooLargeError(message)
