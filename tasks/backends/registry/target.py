"""``--cache-to type=registry,ref=...``: a cache pushed as BuildKit's registry exporter does.

Layer blobs first (HEAD, skip the stored ones; mount from the source repository when the
source is on the same registry; else upload), then the cache config blob, then the manifest,
pushed last by tag with its exact bytes and media type: a tag never names a manifest whose
blobs are not all stored (distribution refuses such a manifest anyway). The manifest and
config are the bytes the local target writes (:func:`tasks.plan.plan_export`), so a cache
pushed here and one written by BuildKit for the same records are the same image.

BuildKit's importer refuses a manifest or a config over 1 MiB: such a cache is refused here
before anything is written (:func:`check_import_limits`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tasks.backends.registry import merge
from tasks.backends.registry.client import RegistryClient
from tasks.backends.registry.errors import check_import_limits
from tasks.backends.registry.upload import (
    OpenSource,
    Sessions,
    push_bytes,
    upload_chunked,
    upload_whole,
)
from tasks.backends.target import CopyOutcome, NameWrite
from tasks.cacheformat import MEDIA_TYPE_CACHE_CONFIG, Descriptor
from tasks.fleet.flight import STORED_MARK_SECONDS, lock_key, single_flight, stored_mark
from tasks.plan import ExportPlan
from tasks.request import RegistrySpec

#: Blobs larger than this go in resumable chunks of this size (CACHESHIP_REGISTRY_CHUNK_SIZE).
DEFAULT_CHUNK_SIZE = 32 * 1024 * 1024


class RegistryTarget:
    """The target role for one repository and tag of a registry."""

    def __init__(
        self,
        client: RegistryClient,
        spec: RegistrySpec,
        redis: Any,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        mount_from: str | None = None,
        on_wait: Callable[[], None] = lambda: None,
    ) -> None:
        self.client, self.spec, self.redis = client, spec, redis
        self.ref = spec.reference
        self.repository = self.ref.repository
        self.chunk_size, self.mount_from, self.on_wait = chunk_size, mount_from, on_wait
        self.sessions = Sessions(redis, self.ref.endpoint_host, self.repository)

    def _lock(self, digest: str) -> str:
        return lock_key(f"registry:{self.ref.endpoint_host}", f"{self.repository}@{digest}")

    def copy_layer(
        self,
        layer: Descriptor,
        open_source: OpenSource,
        progress: Callable[[int], None],
        known_absent: bool = False,
    ) -> CopyOutcome:
        if not known_absent and self.client.blob_size(self.repository, layer.digest) == layer.size:
            return CopyOutcome(layer.digest, layer.size, "skipped")
        # A mount moves zero bytes through the worker; a 202 means the registry wants an upload.
        if self.mount_from and self.mount_from != self.repository:
            offered = self.client.mount(self.repository, layer.digest, self.mount_from)
            if offered is None:
                return CopyOutcome(layer.digest, layer.size, "mounted")
            with contextlib.suppress(Exception):  # the upload below opens its own session
                self.client.cancel_upload(self.repository, offered)
        name = self._lock(layer.digest)
        waited = False

        def wait() -> None:
            nonlocal waited
            waited = True
            self.on_wait()

        with single_flight(self.redis, name, on_wait=wait):
            if (waited or self.redis.exists(stored_mark(name))) and self.client.blob_size(
                self.repository, layer.digest
            ) == layer.size:
                return CopyOutcome(layer.digest, layer.size, "skipped")
            if layer.size > self.chunk_size:
                outcome = upload_chunked(
                    self.client, self.sessions, self.repository, layer, open_source, progress,
                    self.chunk_size,
                )
            else:
                outcome = upload_whole(self.client, self.repository, layer, open_source, progress)
            self.redis.set(stored_mark(name), "1", ex=STORED_MARK_SECONDS)
            return outcome

    def missing(self, layers: Sequence[Descriptor]) -> list[str]:
        found = self.survey(layers)
        return [d.digest for d in layers if not found.get(d.digest)]

    def survey(self, layers: Sequence[Descriptor], parallelism: int = 16) -> dict[str, bool]:
        """HEAD every layer: True when stored with its size, False when absent."""

        def look(layer: Descriptor) -> bool | None:
            try:
                size = self.client.blob_size(self.repository, layer.digest)
            except Exception:
                return None
            return size == layer.size

        if not layers:
            return {}
        with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(layers)))) as pool:
            found = list(pool.map(look, layers))
        return {d.digest: f for d, f in zip(layers, found, strict=True) if f is not None}

    def put_blob(self, desc: Descriptor, data: bytes) -> None:
        """The cache config as a blob; the manifest is not a blob here (see write_names).

        With merge, the config pushed is the merged one, in :meth:`write_names`.
        """
        if desc.media_type != MEDIA_TYPE_CACHE_CONFIG or self.spec.merges:
            return
        if (
            self.mount_from
            and self.mount_from != self.repository
            and self.client.blob_size(self.repository, desc.digest) != desc.size
            and self.client.mount(self.repository, desc.digest, self.mount_from) is None
        ):
            return
        push_bytes(self.client, self.repository, desc, data)

    def write_names(
        self, plan: ExportPlan, on_name: Callable[[NameWrite], None] = lambda write: None
    ) -> list[NameWrite]:
        """The manifest, by tag, last (skipped when the tag already names these bytes)."""
        tag = self.ref.tag or "latest"
        if self.spec.merges:
            write = merge.merge_into_tag(
                self.client, self.redis, self.spec, plan, on_wait=self.on_wait
            )
        else:
            check_import_limits(plan.config_desc, plan.manifest_desc)
            current = self.client.head_manifest(self.repository, tag)
            if current is None or current.digest != plan.manifest_desc.digest:
                self.client.put_manifest(
                    self.repository, tag, plan.manifest, plan.manifest_desc.media_type
                )
            write = NameWrite(name=tag, key=str(self.ref), merged=False)
        on_name(write)
        return [write]

    def abandon(self, digest: str) -> None:
        """Cancel this blob's upload session, if one is recorded (under the blob's lock)."""
        with contextlib.suppress(Exception), single_flight(self.redis, self._lock(digest)):
            saved = self.sessions.get(digest)
            self.sessions.drop(digest)
            if saved is not None:
                self.client.cancel_upload(self.repository, saved[0])
