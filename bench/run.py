"""``python -m bench``: cacheship against a raw boto3 baseline on one local S3-protocol server.

Starts the server, a Redis server and a real ``celery worker`` (the default threads pool,
``--concurrency`` threads) for cacheship, runs the scenarios, prints the table and, with
``--json``, writes every number. Not part of the test run:
``tests/integration/test_bench_smoke.py`` only checks that ``--quick`` works end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import delay, servers
from bench.buildkit import BUILDKIT_EXPORTER, against_buildkit, fixed_costs
from bench.fleet import fleet
from bench.footprint import footprint
from bench.scenarios import SCENARIOS, Context, Row, Sizes
from bench.stack import Cacheship, baseline_upload, bench_client, drop_prefix, new_prefix
from tasks.settings import Settings
from worker.embedded import start_redis

KiB = 1024
# The comparisons with BuildKit's exporter and the fixed costs run after the original ones.
ALL_SCENARIOS = {
    **SCENARIOS,
    "buildkit": against_buildkit,
    "fixed": fixed_costs,
    "fleet": fleet,
    "footprint": footprint,
}
#: Scenarios run once, under the first condition: the format benchmark never talks to the
#: S3 server, and what Redis keeps does not depend on the store's latency.
NO_S3 = {"normalize", "footprint"}
CONDITIONS = ("loopback", "rtt")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    header = ["scenario", "unit", "cacheship", "baseline", "ratio", "target", "result"]
    lines = [
        [
            r.scenario,
            r.unit,
            _fmt(r.cacheship),
            _fmt(r.baseline),
            _fmt(r.ratio, 2),
            r.target,
            "-" if r.passed is None else ("PASS" if r.passed else "FAIL"),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    notes = [f"  {r.scenario}: {r.notes}" for r in rows if r.notes]
    return "\n".join(out + (["", "notes:", *notes] if notes else []))


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke run")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument(
        "--server",
        choices=servers.SERVERS,
        default=None,
        help="S3-protocol server (default: seaweedfs when installed, else moto)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="tasks a worker runs at once (chart default)"
    )
    parser.add_argument(
        "--upload-parallelism", type=int, default=4, help="parts in flight per layer"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(ALL_SCENARIOS),
        help="run only these scenarios (repeatable)",
    )
    parser.add_argument(
        "--scratch", type=Path, default=None, help="scratch directory (default: under /tmp)"
    )
    parser.add_argument(
        "--prune-size",
        default=None,
        metavar="BLOBS,NAMES",
        help="size of the prune scenario (default 100000,1000; --quick 300,10)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=20.0,
        help="round trip the delay line adds between every client and the S3 server",
    )
    parser.add_argument(
        "--condition",
        action="append",
        choices=CONDITIONS,
        help="loopback (the server as it is) and/or rtt (through the delay line); "
        "default: both, loopback first",
    )
    parser.add_argument(
        "--buildkit-exporter",
        type=Path,
        default=os.environ.get(BUILDKIT_EXPORTER) or None,
        metavar="PATH",
        help="binary exporting a local cache with BuildKit's cache/remotecache/s3 exporter "
        f"(see bench/README.md; default ${BUILDKIT_EXPORTER}); without it the raw client "
        "stands in for BuildKit",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker setting, e.g. CACHESHIP_PROGRESS_INTERVAL=1 (repeatable)",
    )
    return parser.parse_args(argv)


def _warm_up(ctx: Context) -> None:
    """Every pool process builds its S3 client and imports once before anything is timed."""
    cache = ctx.cache("warmup", [4 * KiB] * (16 * ctx.concurrency))
    prefix = new_prefix("warmup")
    try:
        ctx.export(cache, prefix)
        baseline_upload(ctx.s3, ctx.theirs, prefix, cache, ctx.total_concurrency, ctx.part_size)
    finally:
        drop_prefix(ctx.s3, ctx.ours, prefix)
        drop_prefix(ctx.s3, ctx.theirs, prefix)


def _label(condition: str, rtt_ms: float) -> str:
    return "loopback" if condition == "loopback" else f"{rtt_ms:g} ms"


def run(args: argparse.Namespace) -> dict[str, Any]:
    kind = args.server or servers.default_server()
    sizes = Sizes.quick() if args.quick else Sizes.full(args.runs)
    if args.prune_size:
        blobs, names = (int(part) for part in args.prune_size.split(","))
        sizes.prune = (blobs, names)
    chosen = args.only or list(ALL_SCENARIOS)
    conditions = [c for c in CONDITIONS if c in (args.condition or CONDITIONS)]
    exporter = str(args.buildkit_exporter) if args.buildkit_exporter else None
    if exporter and not os.access(exporter, os.X_OK):
        raise SystemExit(f"--buildkit-exporter: {exporter} is not an executable file")
    part_size = Settings().part_size
    rows: list[Row] = []
    info: dict[str, Any] = {
        "machine": machine(),
        "server": kind,
        "quick": args.quick,
        "conditions": [_label(c, args.rtt_ms) for c in conditions],
        "rtt_ms": args.rtt_ms,
        "buildkit_exporter": exporter is not None,
    }
    with contextlib.ExitStack() as cleanup:  # undone in reverse, however the run ends
        scratch = Path(tempfile.mkdtemp(prefix="cacheship-bench-", dir=args.scratch))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        _log(f"server: {kind}; scratch: {scratch}")
        server = servers.start(kind)
        cleanup.callback(server.stop)
        redis_server = start_redis()
        cleanup.callback(redis_server.stop)
        source_root = scratch / "sources"
        source_root.mkdir()
        cacheship = Cacheship(
            redis=redis_server,
            s3_url=server.url,
            source_root=source_root,
            log_dir=scratch,
            concurrency=args.concurrency,
            env_extra=dict(item.split("=", 1) for item in args.worker_env),
        )
        cleanup.callback(cacheship.stop)
        started = time.perf_counter()
        s3 = bench_client(server.url, args.concurrency * args.upload_parallelism)
        for bucket in ("cacheship-bench", "baseline-bench"):
            s3.create_bucket(Bucket=bucket)
        done_once: set[str] = set()
        for condition in conditions:
            label = _label(condition, args.rtt_ms)
            url = server.url
            if condition == "rtt":
                line = delay.start(server.url, args.rtt_ms)
                cleanup.callback(line.stop)
                url = line.url
            _log(f"condition {label}: S3 at {url}")
            cacheship.stop()
            cacheship.s3_url = url
            cacheship.start()
            ctx = Context(
                s3=bench_client(url, args.concurrency * args.upload_parallelism),
                cacheship=cacheship,
                ours="cacheship-bench",
                theirs="baseline-bench",
                server_pid=server.proc.pid,
                scratch=scratch,
                sizes=sizes,
                concurrency=args.concurrency,
                upload_parallelism=args.upload_parallelism,
                part_size=part_size,
                log=_log,
                s3_url=url,
                condition=label,
                buildkit_exporter=exporter,
            )
            _warm_up(ctx)
            for name in ALL_SCENARIOS:
                if name not in chosen or (name in NO_S3 and name in done_once):
                    continue
                done_once.add(name)
                _log(f"scenario {name} [{label}]")
                if name == "memory":
                    # A fresh worker, so that every high-water mark belongs to this scenario.
                    cacheship.stop()
                    cacheship.start("mem")
                    _warm_up(ctx)
                found = ALL_SCENARIOS[name](ctx)
                for row in found:
                    row.scenario = f"{row.scenario} [{label}]"
                    row.detail["condition"] = label
                rows.extend(found)
                for cache_dir in source_root.iterdir():
                    if cache_dir.name != "warmup":
                        shutil.rmtree(cache_dir, ignore_errors=True)
    info.update(
        {
            "concurrency": args.concurrency,
            "upload_parallelism": args.upload_parallelism,
            "total_concurrency": args.concurrency * args.upload_parallelism,
            "part_size": part_size,
            "runs": sizes.runs,
            "seconds": round(time.perf_counter() - started, 1),
            "rows": [r.to_json() for r in rows],
        }
    )
    print(table(rows))
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
