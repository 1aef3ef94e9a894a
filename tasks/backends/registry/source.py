"""``--cache-from type=registry,ref=...``: a cache read the way BuildKit's importer reads it.

The tag (or a pinned digest) is resolved with the ``Accept`` of the four manifest types;
the manifest is an OCI image manifest whose config is the cache config, or an index (OCI or
Docker) whose children are the layers and the config (:func:`decode_manifest` tells which).
A pinned digest is checked against the bytes received; the config blob against its
descriptor. Layer blobs are streamed, resuming with a ranged GET when a connection breaks.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import httpx

from tasks.backends.registry.client import RegistryClient
from tasks.backends.registry.errors import RegistryNotFoundError, TransientRegistryError
from tasks.backends.source import (
    MAX_METADATA_BYTES,
    LoadedCache,
    MissingBlobError,
    SourceError,
    check_layer_count,
)
from tasks.cacheformat import Descriptor, FormatError, decode_config, decode_manifest, sha256_digest
from tasks.request import RegistrySpec

#: Times a blob's read picks up again (ranged GET) after its connection broke.
RESUMES = 5


def load(
    spec: RegistrySpec, client: RegistryClient, max_layers: int | None = None
) -> LoadedCache:
    """Manifest → cache config, with every layer descriptor; SourceError naming the ref.

    Over ``max_layers`` layers is refused once the manifest is read, before the config."""
    ref = spec.reference
    try:
        data, media_type = client.get_manifest(ref.repository, ref.reference, MAX_METADATA_BYTES)
    except RegistryNotFoundError as exc:
        what = f"digest {ref.digest}" if ref.digest else f"tag {ref.tag!r}"
        raise SourceError(
            f"source.ref: {ref}: the registry has no {what} in {ref.repository} ({exc.code or 404})"
        ) from None
    digest = sha256_digest(data)
    if ref.digest is not None and digest != ref.digest:
        raise SourceError(f"source.ref: {ref}: the registry sent a manifest of digest {digest}")
    try:
        manifest = decode_manifest(data)
    except FormatError as exc:
        raise SourceError(f"source.ref: {ref}: not a BuildKit cache: {exc}") from None
    check_layer_count(len(manifest.layers), max_layers)
    config_desc = manifest.config
    what = f"config {config_desc.digest}"
    try:
        raw = client.read_blob(ref.repository, config_desc.digest, MAX_METADATA_BYTES)
    except RegistryNotFoundError:
        raise MissingBlobError(f"source {ref}: {what}: missing from the registry") from None
    if len(raw) != config_desc.size:
        raise SourceError(f"source {ref}: {what}: has {len(raw)} bytes, its descriptor says "
                          f"{config_desc.size}")
    if sha256_digest(raw) != config_desc.digest:
        raise SourceError(f"source {ref}: {what}: content does not match its digest")
    try:
        config = decode_config(raw)
    except FormatError as exc:
        raise SourceError(f"source {ref}: {what}: {exc}") from None
    return LoadedCache(
        config=config,
        descriptors={d.digest: d for d in manifest.layers},
        manifest=Descriptor(media_type, digest, len(data)),
        config_desc=config_desc,
    )


class BlobStream(io.RawIOBase):
    """A blob's body to its end across broken connections (ranged GETs from the last byte)."""

    def __init__(self, client: RegistryClient, repository: str, digest: str) -> None:
        super().__init__()
        self.client, self.repository, self.digest = client, repository, digest
        self._left = RESUMES
        self._offset = 0
        self._buffer = b""
        self._response = self._open(0)
        self._pieces: Iterator[bytes] = self._response.iter_raw(1024 * 1024)

    def _open(self, offset: int) -> httpx.Response:
        try:
            return self.client.open_blob(self.repository, self.digest, offset)
        except RegistryNotFoundError:
            raise MissingBlobError(
                f"blob {self.digest} missing from {self.client.host}/{self.repository}"
            ) from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:
            data = self.read(len(view))
            view[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        while not self._buffer:
            try:
                self._buffer = next(self._pieces)
            except StopIteration:
                return b""
            except (httpx.TransportError, httpx.StreamError) as exc:
                if self._left <= 0:
                    raise TransientRegistryError(
                        f"registry {self.client.host}: GET blob {self.digest}: {exc}"
                    ) from None
                self._left -= 1
                with contextlib.suppress(Exception):
                    self._response.close()
                self._response = self._open(self._offset)
                self._pieces = self._response.iter_raw(1024 * 1024)
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        self._offset += len(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._response.close()
        super().close()


def open_blob(spec: RegistrySpec, client: RegistryClient, digest: str) -> BinaryIO:
    """A streaming body of one layer blob."""
    return cast(BinaryIO, BlobStream(client, spec.reference.repository, digest))
