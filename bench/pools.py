"""Where a layer task's time goes: one worker set-up after another on the same servers.

``python -m bench.pools --layers 500 --variant prefork4 --variant threads4`` starts SeaweedFS
and Redis once, then for each variant a worker (pool, concurrency, Celery settings),
exports the same cache of small layers ``--runs`` times and prints per-layer time, worker
CPU per layer, Redis commands per layer and the worker's idle memory. ``--profile DIR``
also records the last run with py-spy (raw folded stacks, every process of the worker).

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
from pathlib import Path
from typing import Any

import redis

from bench import servers
from bench.data import write_cache
from bench.servers import cpu_seconds
from bench.stack import Cacheship, drop_prefix, memory_now, new_prefix
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


def _children(pid: int) -> list[int]:
    from tests.stack import child_pids

    return child_pids(pid)


def run_variant(
    name: str,
    stack: Cacheship,
    cache_path: Path,
    layers: int,
    runs: int,
    bucket: str,
    profile: Path | None,
) -> dict[str, Any]:
    argv, conf = VARIANTS[name]
    env = stack.env()
    env["CACHESHIP_BENCH_CONF"] = json.dumps(conf)
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
    client = Client(stack.redis.url)
    conn = redis.Redis.from_url(stack.redis.url)
    try:
        time.sleep(2)
        request = {"source": {"type": "local", "src": str(cache_path)},
                   "target": {"type": "s3", "bucket": bucket, "prefix": ""}}
        # warm-up: every pool process/thread builds its S3 client
        for _ in range(2):
            prefix = new_prefix("warm")
            request["target"]["prefix"] = prefix
            client.wait(client.submit(request), timeout=900, interval=0.05)
            drop_prefix(stack_s3, bucket, prefix)
        pids = [proc.pid, *_children(proc.pid)]
        idle = memory_now(pids)
        times, cpus, cmds = [], [], []
        for i in range(runs):
            prefix = new_prefix("run")
            request["target"]["prefix"] = prefix
            spy = None
            if profile is not None and i == runs - 1:
                profile.mkdir(parents=True, exist_ok=True)
                spy_bin = str(Path(sys.executable).with_name("py-spy"))
                flame = str(profile / f"{name}.txt")
                spy = subprocess.Popen(
                    [spy_bin, "record", "-p", str(proc.pid), "--subprocesses", "-r", "100",
                     "-f", "raw", "-o", flame, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            c0, k0 = sum(cpu_seconds(p) for p in pids), _commands(conn)
            started = time.perf_counter()
            result = client.wait(client.submit(request), timeout=900, interval=0.05)
            seconds = time.perf_counter() - started
            c1, k1 = sum(cpu_seconds(p) for p in pids), _commands(conn)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            assert result["layers_uploaded"] == layers, result
            drop_prefix(stack_s3, bucket, prefix)
            times.append(seconds)
            cpus.append(c1 - c0)
            cmds.append(k1 - k0)
        med = statistics.median(times)
        return {
            "variant": name,
            "seconds": times,
            "ms_per_layer": round(med / layers * 1000, 2),
            "worker_cpu_ms_per_layer": round(statistics.median(cpus) / layers * 1000, 2),
            "redis_commands_per_layer": round(statistics.median(cmds) / layers, 1),
            "idle_rss_mib": round(idle.rss_sum, 1),
            "idle_pss_mib": round(idle.pss_sum, 1),
            "processes": len(pids),
        }
    finally:
        conn.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


stack_s3: Any = None


def main(argv: list[str] | None = None) -> int:
    global stack_s3
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
    try:
        root = scratch / "sources"
        cache = write_cache(root / "small", [args.size] * args.layers, seed=5)
        stack = Cacheship(redis_server, server.url, root, scratch, 0)
        stack_s3 = bench_client(server.url, 64)
        stack_s3.create_bucket(Bucket="pools")
        for name in args.variant or ["prefork4", "threads4"]:
            row = run_variant(name, stack, cache.path, args.layers, args.runs, "pools",
                              args.profile)
            print(json.dumps(row), flush=True)
    finally:
        redis_server.stop()
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
