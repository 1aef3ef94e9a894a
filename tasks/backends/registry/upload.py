"""One blob into a registry: skipped, mounted, or streamed up (in resumable chunks when big).

A blob up to the chunk size goes in one streamed ``PUT`` (distribution has no single-POST
upload). A larger one goes in ``PATCH`` chunks whose session location is kept in Redis after
every chunk the registry acknowledged: a worker lost mid-upload leaves that location, and the
next worker asks the registry where the session stands (``GET`` → ``Range``) and goes on
from there, or starts a new session when the registry has forgotten it (distribution forgets
a session whose last acknowledged chunk we did not record, and drops a chunk cut mid-way).
The registry checks the digest when the upload is finished; nothing is visible under the
digest before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Final

from tasks.backends.registry.client import RegistryClient
from tasks.backends.registry.errors import PermanentRegistryError, TransientRegistryError
from tasks.backends.target import CopyOutcome, DigestMismatchError
from tasks.cacheformat import Descriptor

PIECE: Final = 1024 * 1024
#: Upload sessions are remembered this long (distribution purges its own after a week).
SESSION_SECONDS: Final = 24 * 3600
_FORGOTTEN: Final = ("BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID")

OpenSource = Callable[[], AbstractContextManager[BinaryIO]]


def session_key(host: str, repository: str, digest: str) -> str:
    where = hashlib.sha256(f"{host}\0{repository}\0{digest}".encode()).hexdigest()[:32]
    return f"cacheship-registry-upload-{where}"


class Sessions:
    """Upload session locations in Redis, per (registry, repository, digest)."""

    def __init__(self, redis: Any, host: str, repository: str) -> None:
        self.redis, self.host, self.repository = redis, host, repository

    def get(self, digest: str) -> tuple[str, int] | None:
        raw = self.redis.get(session_key(self.host, self.repository, digest))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            return str(value["location"]), int(value["offset"])
        except (ValueError, KeyError, TypeError):
            return None

    def put(self, digest: str, location: str, offset: int) -> None:
        value = json.dumps({"location": location, "offset": offset})
        self.redis.set(session_key(self.host, self.repository, digest), value, ex=SESSION_SECONDS)

    def drop(self, digest: str) -> None:
        self.redis.delete(session_key(self.host, self.repository, digest))


def pieces(
    stream: BinaryIO, length: int, progress: Callable[[int], None], start: int
) -> Iterator[bytes]:
    """``length`` bytes of ``stream`` in pieces, reporting bytes done; short is an error."""
    sent = 0
    while sent < length:
        data = stream.read(min(PIECE, length - sent))
        if not data:
            raise DigestMismatchError(
                f"source ended after {start + sent} bytes; its descriptor says more"
            )
        sent += len(data)
        progress(start + sent)
        yield data


def skip(stream: BinaryIO, count: int) -> None:
    """Move the source past what the registry already holds (seek when it can)."""
    if count <= 0:
        return
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(count)
        return
    left = count
    while left > 0:
        data = stream.read(min(PIECE, left))
        if not data:
            raise DigestMismatchError("source is shorter than what the registry holds")
        left -= len(data)


def upload_whole(
    client: RegistryClient,
    repository: str,
    layer: Descriptor,
    open_source: OpenSource,
    progress: Callable[[int], None],
) -> CopyOutcome:
    """POST, then one streamed PUT of the whole blob."""
    location = client.start_upload(repository)
    try:
        with open_source() as stream:
            client.finish_upload(
                repository,
                location,
                layer.digest,
                layer.size,
                pieces(stream, layer.size, progress, 0),
            )
    except PermanentRegistryError as exc:
        if exc.code in ("DIGEST_INVALID", "SIZE_INVALID"):
            raise DigestMismatchError(str(exc)) from None
        raise
    return CopyOutcome(layer.digest, layer.size, "uploaded", bytes_sent=layer.size)


def upload_chunked(
    client: RegistryClient,
    sessions: Sessions,
    repository: str,
    layer: Descriptor,
    open_source: OpenSource,
    progress: Callable[[int], None],
    chunk_size: int,
) -> CopyOutcome:
    """PATCH chunks, the session recorded after each; resumed where the registry stands."""
    digest = layer.digest
    location, offset = None, 0
    saved = sessions.get(digest)
    if saved is not None:
        standing = client.upload_offset(repository, saved[0])
        if standing is not None and standing[0] <= layer.size:
            offset, location = standing
        else:
            sessions.drop(digest)  # forgotten by the registry: start again
    if location is None:
        location = client.start_upload(repository)
        sessions.put(digest, location, 0)
    resumed = offset
    progress(offset)
    try:
        with open_source() as stream:
            skip(stream, offset)
            while offset < layer.size:
                length = min(chunk_size, layer.size - offset)
                location = client.patch(
                    repository, location, offset, length, pieces(stream, length, progress, offset)
                )
                offset += length
                sessions.put(digest, location, offset)
        client.finish_upload(repository, location, digest)
    except TransientRegistryError as exc:
        if exc.code in _FORGOTTEN:
            sessions.drop(digest)
        raise
    except PermanentRegistryError as exc:
        sessions.drop(digest)
        if exc.code in ("DIGEST_INVALID", "SIZE_INVALID"):
            raise DigestMismatchError(str(exc)) from None
        raise
    sessions.drop(digest)
    return CopyOutcome(
        digest, layer.size, "uploaded", bytes_sent=layer.size - resumed, bytes_resumed=resumed
    )


def push_bytes(client: RegistryClient, repository: str, desc: Descriptor, data: bytes) -> bool:
    """A small blob (the cache config) unless stored; False when it already was.

    An upload session cannot be replayed once finished: after a lost answer the blob's HEAD
    tells whether the PUT took effect.
    """
    for attempt in range(3):
        if client.blob_size(repository, desc.digest) == len(data):
            return attempt > 0
        location = client.start_upload(repository)
        try:
            client.finish_upload(repository, location, desc.digest, len(data), iter([data]))
            return True
        except TransientRegistryError:
            if attempt == 2:
                raise
    return True  # pragma: no cover - the loop returns or raises
