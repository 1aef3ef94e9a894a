"""The scenarios: each one times cacheship and its raw baseline back to back, on one server."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from bench.data import BenchCache, write_cache
from bench.servers import cpu_seconds
from bench.stack import (
    Cacheship,
    MemorySampler,
    baseline_heads,
    baseline_upload,
    drop_prefix,
    memory_now,
    new_prefix,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Sizes:
    """What a run measures; ``quick`` shrinks everything to a smoke run of seconds."""

    runs: int
    big: tuple[int, int]
    small: tuple[int, int]
    memory_layer: int
    scale: tuple[int, ...]
    scale_layer: int
    cli: tuple[int, int] = (600, 64 * KiB)
    smoke: bool = False
    # Scenario 7: blobs in the bucket and names (three layers each) referencing some.
    prune: tuple[int, int] = (100_000, 1_000)
    # Scenario 11: layers of the exports whose Redis footprint is measured.
    footprint: tuple[int, ...] = (10, 300, 3000)

    @classmethod
    def full(cls, runs: int) -> Sizes:
        return cls(
            runs=runs,
            big=(4, 256 * MiB),
            small=(500, 64 * KiB),
            memory_layer=2048 * MiB,
            scale=(100, 1000, 5000),
            scale_layer=16 * KiB,
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            runs=1,
            big=(2, 12 * MiB),
            small=(12, 64 * KiB),
            memory_layer=24 * MiB,
            scale=(5, 10, 20),
            scale_layer=4 * KiB,
            cli=(30, 4 * KiB),
            smoke=True,
            prune=(300, 10),
            footprint=(3, 10),
        )


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    unit: str
    cacheship: float | None
    baseline: float | None
    ratio: float | None
    target: str
    passed: bool | None
    notes: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "unit": self.unit,
            "cacheship": self.cacheship,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target,
            "pass": self.passed,
            "notes": self.notes,
            "detail": self.detail,
        }


@dataclass
class Context:
    """Everything the scenarios share: the server, cacheship, a scratch dir, the sizes."""

    s3: S3Client
    cacheship: Cacheship
    ours: str
    theirs: str
    server_pid: int
    scratch: Path
    sizes: Sizes
    concurrency: int
    upload_parallelism: int
    part_size: int
    log: Callable[[str], None]
    #: The URL every S3 client of this condition uses (the server's, or the delay line's).
    s3_url: str = ""
    #: ``loopback``, or the delay line's round trip (``20 ms``): the rows' suffix.
    condition: str = "loopback"
    #: The harness binary running BuildKit's own S3 exporter (``--buildkit-exporter``).
    buildkit_exporter: str | None = None
    _seed: int = 100

    @property
    def total_concurrency(self) -> int:
        """Parts (or requests) in flight at once: pool processes × threads per layer."""
        return self.concurrency * self.upload_parallelism

    def cache(self, name: str, sizes: list[int]) -> BenchCache:
        self._seed += 1
        started = time.perf_counter()
        cache = write_cache(self.cacheship.source_root / name, sizes, seed=self._seed)
        self.log(
            f"  source {name}: {len(sizes)} layers, {cache.bytes_total / MiB:.1f} MiB "
            f"written in {time.perf_counter() - started:.1f}s"
        )
        return cache

    def export(self, cache: BenchCache, prefix: str) -> tuple[float, dict[str, Any]]:
        """cacheship exports ``cache`` into its bucket under ``prefix``."""
        return self.cacheship.export(
            cache, self.ours, prefix=prefix, upload_parallelism=self.upload_parallelism
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Cpu:
    """CPU seconds spent by each party during one side's runs (medians over the runs)."""

    client: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"client": _median(self.client), "server": _median(self.server)}


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _paired(
    ctx: Context,
    label: str,
    run_cacheship: Callable[[], float],
    run_baseline: Callable[[], float],
) -> tuple[list[float], list[float], dict[str, dict[str, float]]]:
    """Alternate the two sides (ABBA…) so drift on a shared machine hits both alike.

    Also counts CPU seconds: cacheship's worker processes, or this process for the
    baseline, and the S3 server's, so the table can say which party bounds a scenario.
    """
    ours: list[float] = []
    theirs: list[float] = []
    cpu = {"cacheship": Cpu(), "baseline": Cpu()}
    for i in range(ctx.sizes.runs):
        order = (run_cacheship, run_baseline) if i % 2 == 0 else (run_baseline, run_cacheship)
        for fn in order:
            mine = fn is run_cacheship
            pids = ctx.cacheship.pids() if mine else []
            client0 = sum(cpu_seconds(p) for p in pids) if mine else _self_cpu()
            server0 = cpu_seconds(ctx.server_pid)
            seconds = fn()
            client1 = sum(cpu_seconds(p) for p in pids) if mine else _self_cpu()
            side = cpu["cacheship" if mine else "baseline"]
            side.client.append(client1 - client0)
            side.server.append(cpu_seconds(ctx.server_pid) - server0)
            (ours if mine else theirs).append(seconds)
        ctx.log(f"  {label} run {i + 1}: cacheship {ours[-1]:.3f}s, baseline {theirs[-1]:.3f}s")
    return ours, theirs, {k: v.summary() for k, v in cpu.items()}


def _cpu_note(cpu: dict[str, dict[str, float]]) -> str:
    ours, theirs = cpu["cacheship"], cpu["baseline"]
    return (
        f"CPU s (client/server): cacheship {ours['client']:.2f}/{ours['server']:.2f}, "
        f"baseline {theirs['client']:.2f}/{theirs['server']:.2f}"
    )


def _upload_scenario(
    ctx: Context, name: str, cache: BenchCache, target: float, keep_last: bool = False
) -> tuple[Row, str | None]:
    kept: list[str] = []

    def ours() -> float:
        prefix = new_prefix("cs")
        seconds, result = ctx.export(cache, prefix)
        if result.get("layers_uploaded") != len(cache.layers):
            raise RuntimeError(f"{name}: expected every layer uploaded, got {result}")
        if keep_last:
            for old in kept:
                drop_prefix(ctx.s3, ctx.ours, old)
            kept[:] = [prefix]
        else:
            drop_prefix(ctx.s3, ctx.ours, prefix)
        return seconds

    def theirs() -> float:
        prefix = new_prefix("bl")
        try:
            return baseline_upload(
                ctx.s3, ctx.theirs, prefix, cache, ctx.total_concurrency, ctx.part_size
            )
        finally:
            drop_prefix(ctx.s3, ctx.theirs, prefix)

    a, b, cpu = _paired(ctx, name, ours, theirs)
    ratio = _ratio(_median(a), _median(b))
    mib = cache.bytes_total / MiB
    row = Row(
        scenario=name,
        unit="s",
        cacheship=_median(a),
        baseline=_median(b),
        ratio=ratio,
        target=f"<= {target:.2f}",
        passed=ratio is not None and ratio <= target,
        notes=(
            f"{len(cache.layers)} layers, {mib:.0f} MiB; cacheship "
            f"{mib / _median(a):.0f} MiB/s, baseline {mib / _median(b):.0f} MiB/s; "
            + _cpu_note(cpu)
        ),
        detail={
            "cacheship_runs": a,
            "baseline_runs": b,
            "layers": len(cache.layers),
            "cpu_seconds": cpu,
        },
    )
    return row, (kept[0] if kept else None)


def big_layers(ctx: Context) -> list[Row]:
    count, size = ctx.sizes.big
    cache = ctx.cache("big", [size] * count)
    row, _ = _upload_scenario(ctx, f"1 big layers {count}x{size // MiB} MiB", cache, 1.05)
    return [row]


def small_layers_and_warm(ctx: Context) -> list[Row]:
    count, size = ctx.sizes.small
    cache = ctx.cache("small", [size] * count)
    row, warm_prefix = _upload_scenario(
        ctx, f"2 small layers {count}x{size // KiB} KiB", cache, 1.5, keep_last=True
    )
    assert warm_prefix is not None
    try:
        warm = _warm(ctx, cache, warm_prefix)
    finally:
        drop_prefix(ctx.s3, ctx.ours, warm_prefix)
    return [row, warm]


def _warm(ctx: Context, cache: BenchCache, prefix: str) -> Row:
    """Re-export into the prefix the last cacheship run filled; the baseline HEADs it."""
    sent: list[int] = []

    def ours() -> float:
        seconds, result = ctx.export(cache, prefix)
        sent.append(int(result["bytes_sent"]))
        if result.get("layers_skipped") != len(cache.layers):
            raise RuntimeError(f"warm re-export: expected every layer skipped, got {result}")
        return seconds

    def theirs() -> float:
        return baseline_heads(ctx.s3, ctx.ours, prefix, cache, ctx.total_concurrency)

    a, b, cpu = _paired(ctx, "warm", ours, theirs)
    ratio = _ratio(_median(a), _median(b))
    return Row(
        scenario=f"3 warm re-export {len(cache.layers)} layers",
        unit="s",
        cacheship=_median(a),
        baseline=_median(b),
        ratio=ratio,
        target="<= 1.20, 0 bytes",
        passed=ratio is not None and ratio <= 1.2 and not any(sent),
        notes=(
            f"bytes uploaded: {max(sent)}; baseline = {len(cache.layers)} HEADs; " + _cpu_note(cpu)
        ),
        detail={"cacheship_runs": a, "baseline_runs": b, "bytes_sent": sent, "cpu_seconds": cpu},
    )


def memory(ctx: Context) -> list[Row]:
    size = ctx.sizes.memory_layer
    cache = ctx.cache("memory", [size])
    pids = ctx.cacheship.pids()
    idle = memory_now(pids)
    prefix = new_prefix("mem")
    try:
        with MemorySampler(pids) as sampler:
            seconds, result = ctx.export(cache, prefix)
    finally:
        drop_prefix(ctx.s3, ctx.ours, prefix)
    if result.get("layers_uploaded") != 1:
        raise RuntimeError(f"memory: expected the layer uploaded, got {result}")
    peak = sampler.peak
    busiest = max(peak.per_process_hwm, key=lambda pid: peak.per_process_hwm[pid])
    before = idle.per_process_rss.get(busiest, 0.0)
    whole = Row(
        scenario="4 memory, whole worker idle",
        unit="MiB",
        cacheship=round(idle.rss_sum, 1),
        baseline=round(idle.pss_sum, 1),
        ratio=None,
        target="<= 250 MiB",
        passed=idle.rss_sum <= 250,
        notes=f"VmRSS summed over the main process and the pool ({len(pids)} processes); "
        "baseline column: PSS summed (shared pages counted once)",
    )
    return [
        whole,
        Row(
            scenario=f"4 memory, one {size // MiB} MiB layer",
            unit="MiB",
            cacheship=round(peak.hwm_max, 1),
            baseline=round(before, 1),
            ratio=None,
            target="<= 150 MiB",
            passed=peak.hwm_max <= 150,
            notes=(
                f"peak RSS (VmHWM) of the process that copied the layer; baseline column: "
                f"its RSS before the copy; the whole worker ({len(pids)} processes: main + "
                f"pool) peaked at {peak.rss_sum:.0f} MiB VmRSS summed (idle "
                f"{idle.rss_sum:.0f}), {peak.pss_sum:.0f} MiB PSS summed (idle "
                f"{idle.pss_sum:.0f}); {size / MiB / seconds:.0f} MiB/s"
            ),
            detail={
                "hwm_max": peak.hwm_max,
                "busiest_rss_before": before,
                "rss_sum_peak": peak.rss_sum,
                "pss_sum_peak": peak.pss_sum,
                "idle_rss_sum": idle.rss_sum,
                "idle_pss_sum": idle.pss_sum,
                "hwm_per_process": {str(k): v for k, v in peak.per_process_hwm.items()},
                "idle_rss_per_process": {str(k): v for k, v in idle.per_process_rss.items()},
                "seconds": seconds,
            },
        )
    ]


def scale(ctx: Context) -> list[Row]:
    r = redis.Redis.from_url(ctx.cacheship.redis.url)
    per_layer: dict[int, float] = {}
    redis_bytes: dict[int, int] = {}
    runs: dict[int, list[float]] = {}
    for count in ctx.sizes.scale:
        cache = ctx.cache(f"scale-{count}", [ctx.sizes.scale_layer] * count)
        repeats = ctx.sizes.runs if count * ctx.sizes.runs <= 3000 else 1
        times: list[float] = []
        for _ in range(repeats):
            before = int(r.info("memory")["used_memory"])
            prefix = new_prefix("scale")
            try:
                seconds, result = ctx.export(cache, prefix)
            finally:
                drop_prefix(ctx.s3, ctx.ours, prefix)
            if result.get("layers_uploaded") != count:
                raise RuntimeError(f"scale {count}: not every layer uploaded: {result}")
            after = int(r.info("memory")["used_memory"])
            redis_bytes[count] = after - before
            times.append(seconds)
            ctx.log(f"  scale {count}: {seconds:.2f}s, redis +{(after - before) / MiB:.1f} MiB")
        runs[count] = times
        per_layer[count] = _median(times) / count
    first, last = ctx.sizes.scale[0], ctx.sizes.scale[-1]
    ratio = per_layer[last] / per_layer[first]
    used = int(r.info("memory")["used_memory"])
    r.close()
    rows = [
        Row(
            scenario=f"5 scale: per-layer time {last} vs {first} layers",
            unit="ms/layer",
            cacheship=round(per_layer[last] * 1000, 2),
            baseline=round(per_layer[first] * 1000, 2),
            ratio=ratio,
            target="<= 1.20",
            passed=ratio <= 1.2,
            notes=(
                "per-layer ms: "
                + ", ".join(f"{n}: {per_layer[n] * 1000:.2f}" for n in ctx.sizes.scale)
                + "; Redis growth per export: "
                + ", ".join(f"{n}: {redis_bytes[n] / MiB:.2f} MiB" for n in ctx.sizes.scale)
                + f"; Redis used_memory at the end {used / MiB:.1f} MiB"
            ),
            detail={
                "runs": {str(k): v for k, v in runs.items()},
                "per_layer_s": {str(k): v for k, v in per_layer.items()},
                "redis_growth_bytes": {str(k): v for k, v in redis_bytes.items()},
                "redis_used_memory": used,
            },
        )
    ]
    return rows


def _wall(value: Any) -> float:
    """Seconds from the format benchmark's report: a number, or [wall, cpu]."""
    return float(value[0] if isinstance(value, list) else value)


_JSON_BASELINE = """
import json, sys, time
data = open(sys.argv[1], "rb").read()
best = None
for _ in range(int(sys.argv[2])):
    started = time.perf_counter()
    json.dumps(json.loads(data), separators=(",", ":"))
    took = time.perf_counter() - started
    best = took if best is None else min(best, took)
print(best)
"""


# A binary normalising a config file with BuildKit's own cache/remotecache/v1 code.
BUILDKIT_NORMALIZE = "CACHESHIP_BENCH_BUILDKIT_NORMALIZE"


def _json_line(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def normalize(ctx: Context) -> list[Row]:
    """Scenario 6 runs the format benchmark (``bench/normalize.py``) as a script.

    Its total (decode, graph, marshal, encode) is set against the raw floor for the same
    bytes, ``json.loads`` then ``json.dumps`` with no model at all, and against BuildKit's
    own Go code normalising the same file (``CACHESHIP_BENCH_BUILDKIT_NORMALIZE``), the
    two sides alternating.
    """
    script = Path(__file__).with_name("normalize.py")
    records, layers = (2_000, 1_000) if ctx.sizes.smoke else (100_000, 50_000)
    name = f"6 normalise {records // 1000}k-record config"
    go_name = f"6 normalise {records // 1000}k vs BuildKit (Go)"
    if not script.exists():
        return [Row(name, "s", None, None, None, "-", None, "bench/normalize.py is not there")]
    config = ctx.scratch / "normalize-config.json"
    size = ["--records", str(records), "--layers", str(layers)]
    subprocess.run([sys.executable, str(script), *size, "--write", str(config)], check=True)
    binary = os.environ.get(BUILDKIT_NORMALIZE)
    sides = ["cacheship", "buildkit"] if binary else ["cacheship"]
    runs: list[float] = []
    go_runs: list[float] = []
    report: dict[str, Any] = {}
    go_report: dict[str, Any] = {}
    for i in range(ctx.sizes.runs):
        for side in sides if i % 2 == 0 else sides[::-1]:
            if side == "cacheship":
                report = _json_line([sys.executable, str(script), "--input", str(config), "--json"])
                runs.append(_wall(report["total_seconds"]))
                ctx.log(f"  normalise: {runs[-1]:.2f}s")
            else:
                go_report = _json_line([str(binary), str(config)])
                go_runs.append(min(float(s) for s in go_report["seconds"]))
                ctx.log(f"  normalise, BuildKit (Go): {go_runs[-1]:.2f}s")
    floor = subprocess.run(
        [sys.executable, "-c", _JSON_BASELINE, str(config), str(max(1, ctx.sizes.runs))],
        check=True,
        capture_output=True,
        text=True,
    )
    config.unlink()
    baseline = float(floor.stdout.strip())
    ours = _median(runs)
    phases = ", ".join(f"{k} {_wall(v):.2f}s" for k, v in report.get("seconds", {}).items())
    rows = [
        Row(
            scenario=name,
            unit="s",
            cacheship=ours,
            baseline=baseline,
            ratio=_ratio(ours, baseline),
            target="report only",
            passed=None,
            notes=(
                f"baseline = json.loads + json.dumps of the same "
                f"{report.get('input_bytes', 0) / MiB:.0f} MiB; phases {phases}"
                f"; peak RSS {report.get('peak_rss_mib')} MiB"
            ),
            detail={"runs": runs, "report": report},
        )
    ]
    if not go_runs:
        note = f"not measured: set {BUILDKIT_NORMALIZE}"
        rows.append(Row(go_name, "s", None, None, None, "<= 1.00", None, note))
        return rows
    theirs = _median(go_runs)
    ratio = _ratio(ours, theirs)
    same = go_report.get("digest") == report.get("digest")
    order = ["decode", "descriptors", "parse", "marshal", "encode"]
    go_phases = ", ".join(
        f"{k} {float(v):.2f}s"
        for k, v in sorted(
            go_report.get("phases", {}).items(),
            key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order),
        )
    )
    rows.append(
        Row(
            scenario=go_name,
            unit="s",
            cacheship=ours,
            baseline=theirs,
            ratio=ratio,
            target="<= 1.00",
            passed=ratio is not None and ratio <= 1.0,
            notes=(
                f"baseline = BuildKit's decode -> ParseConfig -> Marshal -> json.Marshal of the "
                f"same file ({go_report.get('go', 'Go')}); its phases {go_phases}; output "
                + ("identical" if same else f"differs: {go_report.get('digest')}")
            ),
            detail={"runs": go_runs, "report": go_report, "same_output": same},
        )
    )
    return rows


def prune(ctx: Context) -> list[Row]:
    """Scenario 7 lives in ``bench/prune.py``."""
    from bench.prune import prune as run_prune

    return run_prune(ctx)
def _cli_export(ctx: Context, cache: BenchCache, terminal: bool) -> tuple[float, float, int]:
    """``cacheship export --wait`` of ``cache`` as a user runs it; (CPU s, wall s, screens).

    On a terminal (a pseudo-terminal read through a VT100 emulator, 50 × 160) or with its
    progress going to a pipe (the plain lines CI logs get). CPU is the CLI process's own
    (``wait4``), interpreter start-up included.
    """
    from tests.stack import REPO
    from tests.terminal import run_in_terminal

    prefix = new_prefix("cli")
    argv = [
        sys.executable,
        "-m",
        "worker.cli",
        "export",
        "--from",
        f"type=local,src={cache.path}",
        "--to",
        f"type=s3,bucket={ctx.ours},prefix={prefix},"
        f"upload_parallelism={ctx.upload_parallelism}",
        "--wait",
    ]
    env = {**ctx.cacheship.env(), "PYTHONPATH": str(REPO)}
    try:
        if terminal:
            run = run_in_terminal(argv, env, rows=50, cols=160, timeout=3600)
            if run.exit_code != 0:
                raise RuntimeError(f"export on a terminal failed:\n{run.final.text()}")
            return run.cpu_seconds, run.wall_seconds, len(run.screens)
        started = time.perf_counter()
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                log.seek(0)
                raise RuntimeError(f"plain export failed: {log.read().decode()[-2000:]}")
        return usage.ru_utime + usage.ru_stime, time.perf_counter() - started, 0
    finally:
        drop_prefix(ctx.s3, ctx.ours, prefix)


def terminal_view(ctx: Context) -> list[Row]:
    """Scenario 8: what following an export costs the command line, on a terminal and off.

    Reported, not a target: the live view's CPU should stay a few milliseconds per layer
    whatever the number of layers (it draws a fixed-size screen from counters).
    """
    count, size = ctx.sizes.cli
    cache = ctx.cache("cli", [size] * count)
    tty_cpu: list[float] = []
    plain_cpu: list[float] = []
    tty_wall: list[float] = []
    plain_wall: list[float] = []
    screens: list[int] = []
    for i in range(ctx.sizes.runs):
        for terminal in (True, False) if i % 2 == 0 else (False, True):
            cpu, wall, shots = _cli_export(ctx, cache, terminal)
            (tty_cpu if terminal else plain_cpu).append(cpu)
            (tty_wall if terminal else plain_wall).append(wall)
            if terminal:
                screens.append(shots)
        ctx.log(
            f"  cli run {i + 1}: terminal {tty_cpu[-1]:.2f}s CPU / {tty_wall[-1]:.1f}s, "
            f"plain {plain_cpu[-1]:.2f}s CPU / {plain_wall[-1]:.1f}s"
        )
    ours, theirs = _median(tty_cpu), _median(plain_cpu)
    return [
        Row(
            scenario=f"8 CLI CPU following {count} layers on a terminal (vs plain lines)",
            unit="CPU s",
            cacheship=round(ours, 3),
            baseline=round(theirs, 3),
            ratio=_ratio(ours, theirs),
            target="report only",
            passed=None,
            notes=(
                f"{size // KiB} KiB layers; terminal {ours / count * 1000:.2f} ms CPU per layer "
                f"over {_median(tty_wall):.1f}s, plain {theirs / count * 1000:.2f} ms per layer "
                f"over {_median(plain_wall):.1f}s; interpreter start-up included"
            ),
            detail={
                "terminal_cpu_s": tty_cpu,
                "plain_cpu_s": plain_cpu,
                "terminal_wall_s": tty_wall,
                "plain_wall_s": plain_wall,
                "screens_read": screens,
                "layers": count,
            },
        )
    ]


SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "big": big_layers,
    "small": small_layers_and_warm,
    "memory": memory,
    "scale": scale,
    "normalize": normalize,
    "prune": prune,
    "cli": terminal_view,
}
