"""Both sides of a comparison: cacheship (Redis + real ``celery worker`` processes) and the raw
boto3 baseline, talking to the same S3-protocol server.

The baseline uses the product's own S3 client factory, so both sides send the same requests
with the same client configuration (checksums, retries, connection pool).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager

from bench.data import BenchCache
from bench.servers import ACCESS_KEY, SECRET_KEY
from tasks.backends.s3.client import S3Endpoint, client_for
from tests.stack import Worker, child_pids, start_worker
from worker.client import Client
from worker.embedded import ServerProcess

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024


def s3_endpoint(url: str, pool: int = 32) -> S3Endpoint:
    return S3Endpoint(
        endpoint_url=url,
        region="us-east-1",
        use_path_style=True,
        max_pool_connections=max(32, pool),
    )


def bench_client(url: str, pool: int = 32) -> S3Client:
    """The product's client (same config as a worker's), with the benchmark's credentials."""
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    return client_for(s3_endpoint(url, pool))


def new_prefix(label: str) -> str:
    """A fresh key prefix: every run writes where nothing was before."""
    return f"{label}-{uuid.uuid4().hex[:10]}/"


def drop_prefix(client: S3Client, bucket: str, prefix: str) -> None:
    """Delete every object and unfinished upload under ``prefix``: servers keep no garbage."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})  # type: ignore[typeddict-item]
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for upload in uploads:
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


# --- the baseline -------------------------------------------------------------------------


def transfer_config(part_size: int, concurrency: int) -> TransferConfig:
    """boto3's managed transfer as a raw client would use it: parts of the product's size."""
    return TransferConfig(
        multipart_threshold=part_size + 1,
        multipart_chunksize=part_size,
        max_concurrency=concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def baseline_upload(
    client: S3Client,
    bucket: str,
    prefix: str,
    cache: BenchCache,
    concurrency: int,
    part_size: int,
) -> float:
    """boto3's managed transfer uploads every blob of the cache; returns the seconds taken."""
    config = transfer_config(part_size, concurrency)
    started = time.perf_counter()
    with create_transfer_manager(client, config) as manager:
        futures = [
            manager.upload(str(cache.blob_path(d.digest)), bucket, f"{prefix}blobs/{d.digest}")
            for d in cache.layers
        ]
        for future in futures:
            future.result()
    return time.perf_counter() - started


def baseline_heads(
    client: S3Client, bucket: str, prefix: str, cache: BenchCache, concurrency: int
) -> float:
    """HEAD every blob with ``concurrency`` threads; returns the seconds taken."""

    def head(digest: str) -> None:
        client.head_object(Bucket=bucket, Key=f"{prefix}blobs/{digest}")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(head, [d.digest for d in cache.layers]))
    return time.perf_counter() - started


# --- cacheship ------------------------------------------------------------------------------


@dataclass
class Cacheship:
    """A Redis server, one worker (the default threads pool, ``concurrency`` threads), a client."""

    redis: ServerProcess
    s3_url: str
    source_root: Path
    log_dir: Path
    concurrency: int
    env_extra: dict[str, str] = field(default_factory=dict)
    worker: Worker | None = None
    client: Client | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CACHESHIP_", "AWS_"))}
        env.update(
            {
                "CACHESHIP_REDIS_URL": self.redis.url,
                "CACHESHIP_S3_ENDPOINT_URL": self.s3_url,
                "CACHESHIP_S3_REGION": "us-east-1",
                "CACHESHIP_S3_USE_PATH_STYLE": "true",
                "CACHESHIP_SOURCE_ROOTS": str(self.source_root),
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env_extra)
        return env

    def start(self, name: str = "bench") -> None:
        self.worker = start_worker(
            self.env(), self.log_dir, name=name, concurrency=self.concurrency
        )
        self.client = Client(self.redis.url)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def export(
        self, cache: BenchCache, bucket: str, timeout: float = 3600, **target: Any
    ) -> tuple[float, dict[str, Any]]:
        """Submit an export of ``cache`` into ``bucket``; (seconds to the final result, result)."""
        assert self.client is not None
        request = {
            "source": {"type": "local", "src": str(cache.path)},
            "target": {"type": "s3", "bucket": bucket, **target},
        }
        started = time.perf_counter()
        export_id = self.client.submit(request)
        result = self.client.wait(export_id, timeout=timeout, interval=0.01)
        return time.perf_counter() - started, result

    def pids(self) -> list[int]:
        """The worker's main process and its pool children."""
        assert self.worker is not None
        main = self.worker.proc.pid
        return [main, *child_pids(main)]


def _status_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class MemoryPeak:
    """Peaks over the sampled processes, in MiB."""

    rss_sum: float = 0.0
    pss_sum: float = 0.0
    hwm_max: float = 0.0
    per_process_hwm: dict[int, float] = field(default_factory=dict)
    per_process_rss: dict[int, float] = field(default_factory=dict)


def memory_now(pids: Iterable[int]) -> MemoryPeak:
    pids = list(pids)
    hwm = {pid: _status_kib(pid, "VmHWM") / 1024 for pid in pids}
    rss = {pid: _status_kib(pid, "VmRSS") / 1024 for pid in pids}
    return MemoryPeak(
        rss_sum=sum(rss.values()),
        pss_sum=sum(_pss_kib(pid) for pid in pids) / 1024,
        hwm_max=max(hwm.values(), default=0.0),
        per_process_hwm=hwm,
        per_process_rss=rss,
    )


class MemorySampler:
    """Samples RSS and PSS of a set of processes in a thread; keeps the peaks."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = memory_now(self.pids)
            self.peak.rss_sum = max(self.peak.rss_sum, now.rss_sum)
            self.peak.pss_sum = max(self.peak.pss_sum, now.pss_sum)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        final = memory_now(self.pids)
        self.peak.hwm_max = final.hwm_max
        self.peak.per_process_hwm = final.per_process_hwm
