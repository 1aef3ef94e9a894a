"""Where a layer task's time goes: one worker set-up after another on the same servers.

``python -m bench.pools --layers 500 --variant prefork4 --variant threads4`` starts SeaweedFS,
Redis and one worker per variant (pool, concurrency, Celery settings), each on a queue of
its own; exports the same cache of small layers with each variant in turn, ``--runs``
times, interleaved so that a shared machine's drift hits all alike; and prints per-layer
time, worker CPU and Redis commands per layer and the worker's idle memory. ``--profile
DIR`` records one more export per variant with py-spy (raw folded stacks, every process).

Variants override Celery settings through ``bench.variant`` (a ``-A`` module that loads
the product's app and applies ``CACHESHIP_BENCH_CONF``), so the product code is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import servers
from bench.data import write_cache
from bench.servers import cpu_seconds
from bench.stack import Cacheship, MemoryPeak, drop_prefix, memory_now, new_prefix
from worker.client import Client
from worker.embedded import start_redis

REPO = Path(__file__).resolve().parents[1]
KiB = 1024

#: name -> (worker options, Celery settings to override)
VARIANTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "prefork4": (["--pool", "prefork", "--concurrency", "4"], {}),
    "prefork2": (["--pool", "prefork", "--concurrency", "2"], {}),
    "threads4": (["--pool", "threads", "--concurrency", "4"], {}),
    "threads8": (["--pool", "threads", "--concurrency", "8"], {}),
    "threads16": (["--pool", "threads", "--concurrency", "16"], {}),
    "solo": (["--pool", "solo"], {}),
    "prefork4-lean": (
        ["--pool", "prefork", "--concurrency", "4"],
        {"task_track_started": False, "worker_send_task_events": False},
    ),
    "threads8-lean": (
        ["--pool", "threads", "--concurrency", "8"],
        {"task_track_started": False, "worker_send_task_events": False},
    ),
    "threads8-nostarted": (
        ["--pool", "threads", "--concurrency", "8"],
        {"task_track_started": False},
    ),
    "threads8-noevents": (
        ["--pool", "threads", "--concurrency", "8"],
        {"worker_send_task_events": False},
    ),
    "threads4-nosent": (
        ["--pool", "threads", "--concurrency", "4"],
        {"task_send_sent_event": False},
    ),
    "threads4-nostarted": (
        ["--pool", "threads", "--concurrency", "4"],
        {"task_track_started": False},
    ),
    "threads8-prefetch4": (
        ["--pool", "threads", "--concurrency", "8"],
        {"worker_prefetch_multiplier": 4},
    ),
}


def _commands(conn: redis.Redis) -> int:
    stats: dict[str, Any] = conn.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


@dataclass
class Variant:
    """One worker set-up, listening on a queue of its own, and what it measured."""

    name: str
    proc: subprocess.Popen[bytes]
    client: Client
    times: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    commands: list[int] = field(default_factory=list)
    idle: MemoryPeak | None = None

    def pids(self) -> list[int]:
        from tests.stack import child_pids

        return [self.proc.pid, *child_pids(self.proc.pid)]


def start_variant(name: str, stack: Cacheship) -> Variant:
    argv, conf = VARIANTS[name]
    queue = f"pools-{name}"
    env = stack.env()
    env["CACHESHIP_BENCH_CONF"] = json.dumps(conf)
    env["CACHESHIP_QUEUE"] = queue
    # celery worker takes a configured pool over its own default (prefork): say it here too.
    env["CACHESHIP_POOL"] = argv[argv.index("--pool") + 1]
    log = stack.log_dir / f"worker-{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.variant", "worker", "--loglevel",
             "WARNING", "--without-mingle", "--without-gossip", "--hostname",
             f"{name}@%h", *argv],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return Variant(name, proc, Client(stack.redis.url, queue=queue))


def export_once(
    variant: Variant, s3: Any, cache_path: Path, bucket: str, conn: redis.Redis | None = None,
    profile: Path | None = None,
) -> None:
    """One export into a fresh prefix; timed, with CPU and Redis commands when ``conn``."""
    prefix = new_prefix("run")
    request = {"source": {"type": "local", "src": str(cache_path)},
               "target": {"type": "s3", "bucket": bucket, "prefix": prefix}}
    pids = variant.pids()
    spy = None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        spy_bin = str(Path(sys.executable).with_name("py-spy"))
        flame = str(profile / f"{variant.name}.txt")
        spy = subprocess.Popen(
            [spy_bin, "record", "-p", str(variant.proc.pid), "--subprocesses", "-r", "100",
             "-f", "raw", "-o", flame, "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
    c0 = sum(cpu_seconds(p) for p in pids)
    k0 = _commands(conn) if conn is not None else 0
    started = time.perf_counter()
    client = variant.client
    result = client.wait(client.submit(request), timeout=900, interval=0.05)
    seconds = time.perf_counter() - started
    c1 = sum(cpu_seconds(p) for p in pids)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    drop_prefix(s3, bucket, prefix)
    if conn is not None:
        variant.times.append(seconds)
        variant.cpus.append(c1 - c0)
        variant.commands.append(_commands(conn) - k0)
    if not result.get("layers_uploaded"):
        raise RuntimeError(f"{variant.name}: nothing uploaded: {result}")


def summary(variant: Variant, layers: int) -> dict[str, Any]:
    med = statistics.median(variant.times)
    assert variant.idle is not None
    return {
        "variant": variant.name,
        "seconds": [round(t, 3) for t in variant.times],
        "ms_per_layer": round(med / layers * 1000, 2),
        "worker_cpu_ms_per_layer": round(statistics.median(variant.cpus) / layers * 1000, 2),
        "redis_commands_per_layer": round(statistics.median(variant.commands) / layers, 1),
        "idle_rss_mib": round(variant.idle.rss_sum, 1),
        "idle_pss_mib": round(variant.idle.pss_sum, 1),
        "processes": len(variant.pids()),
    }


def stop(variant: Variant) -> None:
    if variant.proc.poll() is None:
        os.killpg(variant.proc.pid, signal.SIGTERM)
        try:
            variant.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(variant.proc.pid, signal.SIGKILL)
            variant.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pools", description=__doc__)
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--size", type=int, default=64 * KiB)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args(argv)
    from bench.stack import bench_client

    scratch = Path(tempfile.mkdtemp(prefix="cacheship-pools-"))
    server = servers.start(servers.default_server())
    redis_server = start_redis()
    variants: list[Variant] = []
    try:
        root = scratch / "sources"
        cache = write_cache(root / "small", [args.size] * args.layers, seed=5)
        warm = write_cache(root / "warm", [4 * KiB] * 32, seed=6)
        stack = Cacheship(redis_server, server.url, root, scratch, 0)
        s3 = bench_client(server.url, 64)
        s3.create_bucket(Bucket="pools")
        conn = redis.Redis.from_url(redis_server.url)
        for name in args.variant or ["prefork4", "threads4"]:
            variants.append(start_variant(name, stack))
        time.sleep(3)
        for variant in variants:  # every thread / process builds its S3 client
            for _ in range(2):
                export_once(variant, s3, warm.path, "pools")
            variant.idle = memory_now(variant.pids())
        # Interleaved (A B C, C B A, ...): a shared machine's drift hits every variant alike.
        for i in range(args.runs):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                export_once(variant, s3, cache.path, "pools", conn)
                print(f"  {variant.name}: {variant.times[-1]:.2f}s", file=sys.stderr, flush=True)
        if args.profile is not None:
            for variant in variants:
                export_once(variant, s3, cache.path, "pools", None, args.profile)
        for variant in variants:
            print(json.dumps(summary(variant, args.layers)), flush=True)
    finally:
        for variant in variants:
            stop(variant)
        redis_server.stop()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
