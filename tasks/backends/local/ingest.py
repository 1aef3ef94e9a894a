"""A content ingester on disk, with containerd's contract (its ``content/local`` store).

Bytes stream into a temporary file under ``DIR/ingest/``, hashed as they are written; on
commit the file is fsynced, its size and sha256 compared with the descriptor's, made
read-only and renamed into ``DIR/blobs/sha256/<hex>``; then the directory is fsynced. A
blob therefore exists under its digest only with exactly that content, and a reader of the
layout (BuildKit, or cacheship's own local source) never looks into ``ingest/``.

Every temporary file is ``flock``ed by its writer for as long as it is open. The kernel
drops the lock when the writer dies (SIGKILL, OOM, power loss of the node aside), so a
file in ``ingest/`` that can be locked belongs to nobody and is removed by
:func:`clean_ingest`, which any later writer runs; a file still locked is a live upload of
a concurrent export and is left alone. Only files named by this module are touched:
containerd's own ingest directories (a BuildKit client writing the same layout) are not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import Final

from tasks.backends.local.ociindex import fsync_dir
from tasks.backends.target import DigestMismatchError
from tasks.cacheformat import check_digest

INGEST_DIR: Final = "ingest"
_PREFIX: Final = "cacheship-"


def blob_file(directory: Path, digest: str) -> Path:
    """``DIR/blobs/sha256/<hex>``."""
    algorithm, _, hexpart = check_digest(digest, "digest").partition(":")
    return directory / "blobs" / algorithm / hexpart


def present(directory: Path, digest: str, size: int) -> bool:
    """The blob is stored with its size (the bytes were checked when it was committed).

    Only a regular file counts: a symlink planted under a digest is replaced, not trusted.
    """
    try:
        info = os.lstat(blob_file(directory, digest))
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def clean_ingest(directory: Path, digest: str | None = None) -> list[str]:
    """Remove temporary files no live writer holds (of one blob, or all); returns their names."""
    ingest = directory / INGEST_DIR
    prefix = _PREFIX
    if digest is not None:
        prefix += check_digest(digest, "digest").partition(":")[2] + "-"
    removed = []
    try:
        names = [n for n in os.listdir(ingest) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    for name in names:
        path = ingest / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already (committed or cleaned by someone else)
        try:
            if _try_lock(fd):
                # Unlinked while locked: a writer that opened it but has not locked it yet
                # sees the file gone once it holds the lock, and starts another one.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                removed.append(name)
        finally:
            os.close(fd)
    return removed


class LocalBlobWriter:
    """One blob on its way in: ``write`` chunks, then ``commit``, or ``close`` to drop it."""

    def __init__(self, directory: Path, digest: str, size: int) -> None:
        self.directory = directory
        self.digest = check_digest(digest, "digest")
        self.size = size
        self.target = blob_file(directory, digest)
        self.offset = 0
        self._sha = hashlib.sha256()
        ingest = directory / INGEST_DIR
        hexpart = self.digest.partition(":")[2]
        while True:
            path = ingest / f"{_PREFIX}{hexpart}-{uuid.uuid4().hex}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits at most for a cleaner's unlink
            if os.fstat(fd).st_nlink > 0:
                break
            os.close(fd)  # a cleaner took it between create and lock: start another
        self.path = path
        self._fd: int | None = fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append and hash; more bytes than the descriptor says is a mismatch at once."""
        if self._fd is None:
            raise ValueError("writer is closed")
        if self.offset + len(data) > self.size:
            raise DigestMismatchError(
                f"source has more than the {self.size} bytes its descriptor says"
            )
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._sha.update(data)
        self.offset += len(data)

    def commit(self) -> None:
        """Size and digest checked, then fsync, read-only, rename into ``blobs/``, dir fsync.

        On a mismatch the temporary file is removed and nothing appears under the digest.
        """
        fd = self._fd
        if fd is None:
            raise ValueError("writer is closed")
        try:
            if self.offset != self.size:
                raise DigestMismatchError(
                    f"source has {self.offset} bytes, descriptor says {self.size}"
                )
            actual = "sha256:" + self._sha.hexdigest()
            if actual != self.digest:
                raise DigestMismatchError(f"content does not match its digest (got {actual})")
            os.fsync(fd)
            # containerd leaves committed blobs readable only (creation umask honoured).
            os.fchmod(fd, os.fstat(fd).st_mode & 0o444)
            os.rename(self.path, self.target)
        except BaseException:
            self.close()
            raise
        fsync_dir(self.target.parent)
        self._fd = None
        os.close(fd)

    def close(self) -> None:
        """Drop an unfinished blob: its temporary file goes, the lock with it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)


def put_bytes(directory: Path, digest: str, data: bytes) -> bool:
    """A small blob (config, manifest) through the same checks; False when already stored."""
    if present(directory, digest, len(data)):
        return False
    writer = LocalBlobWriter(directory, digest, len(data))
    try:
        writer.write(data)
        writer.commit()
    finally:
        writer.close()
    return True
