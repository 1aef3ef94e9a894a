"""``--cache-to type=local,dest=DIR``: a cache written into an OCI image layout on disk.

What BuildKit's local cache exporter leaves in ``DIR`` after an export, this target leaves
too, byte for byte: ``blobs/sha256/<hex>`` for every layer, the cache config and the cache
manifest (read-only, as containerd's store commits them), ``oci-layout``, ``index.json``
listing the manifest under its tag, and an empty ``ingest/``. Blobs go through
:mod:`tasks.backends.local.ingest` (checked, then renamed into place); ``index.json`` is written
last (:mod:`tasks.backends.local.ociindex`), so a reader sees the previous cache or the new
one, never a half-written one.

Workers write only under the configured destination roots (``CACHESHIP_DEST_ROOTS``),
passed in by the caller: domain code never reads settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import BinaryIO

from tasks.backends.local.ingest import (
    INGEST_DIR,
    LocalBlobWriter,
    clean_ingest,
    present,
    put_bytes,
)
from tasks.backends.local.ociindex import INDEX_FILE, put_tagged
from tasks.backends.target import CopyOutcome, NameWrite
from tasks.cacheformat import Descriptor
from tasks.plan import ExportPlan
from tasks.request import LocalTargetSpec, RequestError

CHUNK = 1024 * 1024


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_dest_dir(dest: str, roots: Sequence[Path]) -> Path:
    """The real directory behind ``dest`` (it may not exist yet), refused outside the roots."""
    if not roots:
        raise RequestError("target.dest: local targets are disabled (set CACHESHIP_DEST_ROOTS)")
    path = Path(dest)
    if not path.is_absolute():
        raise RequestError("target.dest: must be an absolute path")
    real = Path(os.path.realpath(path))
    if not any(_inside(real, Path(os.path.realpath(root))) for root in roots):
        raise RequestError("target.dest: outside the allowed destination roots")
    if real.exists() and not real.is_dir():
        raise RequestError("target.dest: not a directory")
    return real


class LocalTarget:
    """The target role for a directory; every method is safe to run again (task retries)."""

    def __init__(self, spec: LocalTargetSpec, roots: Sequence[Path]) -> None:
        self.spec = spec
        self.directory = resolve_dest_dir(spec.dest, roots)
        self._ready = False

    def _prepare(self) -> None:
        """Create the layout's directories on first write (nothing is created for a bad request).

        A ``blobs`` or ``ingest`` that is a symlink out of the directory is refused: a
        blob must land where a reader of this directory will look for it.
        """
        if self._ready:
            return
        for sub, mode in (("blobs/sha256", 0o755), (INGEST_DIR, 0o777)):
            path = self.directory / sub
            path.mkdir(mode=mode, parents=True, exist_ok=True)
            if not _inside(Path(os.path.realpath(path)), self.directory):
                raise RequestError(f"target.dest: {sub} leads out of the directory")
        self._ready = True

    def copy_layer(
        self,
        layer: Descriptor,
        open_source: Callable[[], AbstractContextManager[BinaryIO]],
        progress: Callable[[int], None] = lambda done: None,
        known_absent: bool = False,
    ) -> CopyOutcome:
        """Skip a blob already stored with its size, else stream it through the ingester."""
        self._prepare()
        if not known_absent and present(self.directory, layer.digest, layer.size):
            return CopyOutcome(layer.digest, layer.size, "skipped")
        writer = LocalBlobWriter(self.directory, layer.digest, layer.size)
        try:
            with open_source() as stream:
                while chunk := stream.read(CHUNK):
                    writer.write(chunk)
                    progress(writer.offset)
            writer.commit()
        finally:
            writer.close()
        return CopyOutcome(layer.digest, layer.size, "uploaded", bytes_sent=layer.size)

    def missing(self, layers: Sequence[Descriptor]) -> list[str]:
        """Digests of layers absent, or present with another size."""
        return [d.digest for d in layers if not present(self.directory, d.digest, d.size)]

    def survey(self, layers: Sequence[Descriptor], parallelism: int = 16) -> dict[str, bool]:
        """Stored with its size (True) or not (False): a stat each, no threads needed."""
        return {d.digest: present(self.directory, d.digest, d.size) for d in layers}

    def put_blob(self, desc: Descriptor, data: bytes) -> None:
        """The config or manifest blob, checked like any other."""
        self._prepare()
        put_bytes(self.directory, desc.digest, data)

    def write_names(
        self, plan: ExportPlan, on_name: Callable[[NameWrite], None] = lambda write: None
    ) -> list[NameWrite]:
        """``index.json`` lists the manifest under the tag; stale temporary files go after.

        The tag replaces what it named (BuildKit's way); other tags are kept.
        """
        self._prepare()
        put_tagged(self.directory, plan.manifest_desc, self.spec.tag)
        clean_ingest(self.directory)
        write = NameWrite(name=self.spec.tag, key=str(self.directory / INDEX_FILE), merged=False)
        on_name(write)
        return [write]

    def abandon(self, digest: str) -> None:
        """No temporary file of this blob is left unless a live writer holds it."""
        with suppress(OSError):
            clean_ingest(self.directory, digest)
