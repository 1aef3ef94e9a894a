"""Source caches for the benchmark: BuildKit's local cache layout, with blobs of chosen sizes.

Layer blobs are pseudo-random bytes (incompressible, like gzip'd layers) written in chunks,
so a 2 GiB layer never sits in memory here. The cache config and manifest are built by the
project's own codec, exactly as ``worker.samplecache`` does for real gzip'd layers; layer
chains are kept short (``CHAIN``) so that thousands of layers make a realistic, shallow graph.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.cacheformat import Descriptor
from worker.samplecache import LAYER_GZIP, write_layout

WRITE_CHUNK = 8 * 1024 * 1024
CHAIN = 20


@dataclass(frozen=True)
class BenchCache:
    """A cache directory and the layers it holds (with the path of every blob)."""

    path: Path
    layers: list[Descriptor]

    @property
    def bytes_total(self) -> int:
        return sum(d.size for d in self.layers)

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_random_blob(directory: Path, size: int, rng: random.Random) -> str:
    """Stream ``size`` pseudo-random bytes to a temporary file, then name it by its digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".incoming-{rng.getrandbits(64):016x}"
    sha = hashlib.sha256()
    with tmp.open("wb") as out:
        left = size
        while left:
            chunk = rng.randbytes(min(WRITE_CHUNK, left))
            sha.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    digest = "sha256:" + sha.hexdigest()
    tmp.replace(blobs / digest.removeprefix("sha256:"))
    return digest


def write_cache(directory: Path, layer_sizes: list[int], seed: int = 1) -> BenchCache:
    """A build whose steps each add one layer; every ``CHAIN`` layers a new chain starts."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    layers_json: list[dict[str, object]] = []
    records: list[dict[str, object]] = [{"digest": _sha(f"base-{seed}".encode())}]
    for i, size in enumerate(layer_sizes):
        digest = _write_random_blob(directory, size, rng)
        created = (base + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
        chained = i % CHAIN != 0
        layers_json.append(
            {
                "blob": digest,
                "parent": i - 1 if chained else -1,
                "annotations": {
                    "mediaType": LAYER_GZIP,
                    "diffID": _sha(f"diff-{digest}".encode()),
                    "size": size,
                    "createdAt": created,
                },
            }
        )
        records.append(
            {
                "digest": _sha(f"step-{seed}-{i}".encode()),
                "inputs": [[{"selector": "", "link": len(records) - 1 if chained else 0}]],
                "layers": [{"layer": i, "createdAt": created}],
            }
        )
    layers, _, _ = write_layout(directory, {"layers": layers_json, "records": records})
    return BenchCache(directory, layers)
