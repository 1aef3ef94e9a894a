"""BuildKit's S3 cache layout as a ``Target`` (:mod:`tasks.backends.target`), one writer per blob
across the fleet."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from tasks.backends.s3.copy import copy_blob, fresh
from tasks.backends.s3.ingester import open_uploads, stat
from tasks.backends.s3.names import write_names
from tasks.backends.s3.publish import missing_blobs, put_blob
from tasks.backends.target import CopyOutcome, NameWrite, OpenSource
from tasks.cacheformat import Descriptor
from tasks.fleet.flight import STORED_MARK_SECONDS, lock_key, single_flight, stored_mark
from tasks.plan import ExportPlan
from tasks.request import S3Spec

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Target:
    """BuildKit's S3 cache layout, with one writer per blob across the fleet."""

    def __init__(
        self,
        client: S3Client,
        spec: S3Spec,
        redis: Any,
        *,
        head_forbidden: Literal["upload", "fail"] = "upload",
        min_part_size: int = 8 * 1024 * 1024,
        on_wait: Callable[[], None] = lambda: None,
        on_pull: Callable[[list[str]], None] = lambda digests: None,
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_pull``: blobs a merge keeps from a stored name (see ``write_name``)."""
        self.client, self.spec, self.redis = client, spec, redis
        self.head_forbidden, self.min_part_size = head_forbidden, min_part_size
        self.on_wait, self.on_pull = on_wait, on_pull
        # Called every few seconds while waiting for a blob's lock: the wait is progress.
        self.on_tick = on_tick

    def copy_layer(
        self,
        layer: Descriptor,
        open_source: OpenSource,
        progress: Callable[[int], None],
        known_absent: bool = False,
    ) -> CopyOutcome:
        key = self.spec.blob_key(layer.digest)
        info = None if known_absent else stat(self.client, self.spec.bucket, key,
                                              self.head_forbidden)

        def copy(head: bool = True) -> CopyOutcome:
            return copy_blob(
                open_source,
                self.client,
                self.spec,
                layer,
                head_forbidden=self.head_forbidden,
                min_part_size=self.min_part_size,
                progress=progress,
                head=head,
                info=info,
            )

        if info is not None and info.size == layer.size:
            return copy(head=False)  # present: skipped or touched, no need to coordinate
        # Absent: upload under the blob's fleet-wide lock, small blobs too, so that the fleet
        # sends each blob once. Holding it, look again only when another writer may have
        # stored the blob since the look above: we waited for the lock, or a writer's mark
        # says it stored the blob lately. Without either, uploading is right (and harmless
        # even if a writer outside the fleet raced us: the same bytes under the same key).
        name = lock_key(self.spec.bucket, key)
        waited = False

        def wait() -> None:
            nonlocal waited
            waited = True
            self.on_wait()

        with single_flight(self.redis, name, on_wait=wait, on_tick=self.on_tick):
            look = waited or info is not None or bool(self.redis.exists(stored_mark(name)))
            outcome = copy(head=look)
            if outcome.action == "uploaded":
                self.redis.set(stored_mark(name), "1", ex=STORED_MARK_SECONDS)
            return outcome

    def missing(self, layers: Sequence[Descriptor]) -> list[str]:
        return missing_blobs(self.client, self.spec, layers, self.head_forbidden)

    def survey(self, layers: Sequence[Descriptor], parallelism: int = 16) -> dict[str, bool]:
        """Which ``layers`` need nothing (True) and which are absent (False), by HEAD.

        True: stored with its size and too young to need a touch; BuildKit's exporter skips
        those the same way. Layers left out (wrong size, due a touch, a HEAD that failed)
        say nothing: their own task looks again, with its retries. ``parallelism`` HEADs
        are in flight at once.
        """

        def look(layer: Descriptor) -> bool | None:
            try:
                info = stat(
                    self.client, self.spec.bucket, self.spec.blob_key(layer.digest),
                    self.head_forbidden,
                )
            except Exception:
                return None
            if info is None:
                return False
            if info.size == layer.size and fresh(info, self.spec.touch_refresh):
                return True
            return None

        if not layers:
            return {}
        with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(layers)))) as pool:
            found = list(pool.map(look, layers))
        return {layer.digest: f for layer, f in zip(layers, found, strict=True) if f is not None}

    def put_blob(self, desc: Descriptor, data: bytes) -> None:
        put_blob(self.client, self.spec, desc, data)

    def write_names(
        self, plan: ExportPlan, on_name: Callable[[NameWrite], None] = lambda write: None
    ) -> list[NameWrite]:
        return write_names(
            self.client,
            self.redis,
            self.spec,
            plan.s3_config,
            on_name,
            head_forbidden=self.head_forbidden,
            on_wait=self.on_wait,
            on_pull=self.on_pull,
        )

    def abandon(self, digest: str) -> None:
        key = self.spec.blob_key(digest)
        # Under the blob's lock: never abort the upload another export is writing right now.
        with (
            contextlib.suppress(Exception),
            single_flight(self.redis, lock_key(self.spec.bucket, key)),
        ):
            for upload_id in open_uploads(self.client, self.spec.bucket, key):
                self.client.abort_multipart_upload(
                    Bucket=self.spec.bucket, Key=key, UploadId=upload_id
                )
