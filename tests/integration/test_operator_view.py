"""What an operator sees: the live view on a real terminal, enqueue-time refusals, the log.

Everything runs for real: embedded Redis and S3 servers, a ``cacheship worker``, and the
``cacheship`` console script on a pseudo-terminal whose screen is read through a VT100
emulator (``tests/terminal.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.stack import Worker
from tests.terminal import run_in_terminal
from worker.client import Client, ExportError
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache

# ``python -m worker.cli`` is the console script ``cacheship``, run from this checkout.
CACHESHIP = [sys.executable, "-m", "worker.cli"]
ROWS, COLS = 40, 150
LAYERS = 320


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CACHESHIP, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def corrupt(cache_dir: Path, digest: str) -> None:
    """Flip one byte of a layer blob: its copy fails with a digest mismatch."""
    path = cache_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def test_the_terminal_view_of_hundreds_of_layers(
    env: dict[str, str],
    source_root: Path,
    bucket: str,
    workers: Callable[..., Worker],
) -> None:
    cache = write_sample_cache(source_root / "big", [6000 + 37 * i for i in range(LAYERS)], seed=3)
    bad = cache.layers[4]
    corrupt(cache.path, bad.digest)
    workers(env, concurrency=2)

    run = run_in_terminal(
        [
            *CACHESHIP,
            "export",
            "--from",
            f"type=local,src={cache.path}",
            "--to",
            f"type=s3,bucket={bucket},name=many",
            "--wait",
        ],
        env,
        rows=ROWS,
        cols=COLS,
        timeout=600,
    )
    final = run.final.text()
    assert run.exit_code == 1, final
    print(f"\nCLI on a terminal, {LAYERS} layers: {run.cpu_seconds:.2f}s CPU, "
          f"{run.wall_seconds:.1f}s wall, {len(run.screens)} screens read")

    short = bad.digest[:19]  # "sha256:" + 12 hex digits, as the rows show it
    seen_phases: list[str] = []
    failure_seen_at: int | None = None
    for index, shot in enumerate(run.screens):
        text = shot.text()
        head = next((line for line in shot.lines if line.startswith("export ")), None)
        if head is None:
            continue
        for phase in ("queued", "reading", "copying", "verifying", "writing", "failed"):
            if phase in head and phase not in seen_phases:
                seen_phases.append(phase)
        # the live region always fits the screen, whatever the number of layers
        live = shot.lines[shot.lines.index(head) :]
        live = live[: max((i for i, line in enumerate(live) if line.strip()), default=0) + 1]
        assert len(live) < ROWS, text
        layer_rows = [line for line in live if line.startswith("  writing layer ")]
        assert len(layer_rows) <= 12, text
        if "layers " in text and f"/{LAYERS}" in text:
            # aggregate lines: layers done/total, bytes with a total
            assert re.search(rf"^layers .* \d+/{LAYERS}\b", text, re.M), text
            assert re.search(r"^bytes .* [\d.]+ (B|KiB|MiB) / [\d.]+ MiB", text, re.M), text
            more = re.search(r"^  … (\d+) more layers: ", text, re.M)
            assert more and int(more.group(1)) + len(layer_rows) == LAYERS, text
        if failure_seen_at is None and any(
            short in line and "failed" in line for line in layer_rows
        ):
            failure_seen_at = index
        if failure_seen_at is not None:
            # once a layer failed, it stays on screen however many others finish
            assert any(short in line and "failed" in line for line in layer_rows), text
    assert failure_seen_at is not None, final
    assert "copying" in seen_phases, seen_phases
    assert seen_phases[-1] == "failed", seen_phases
    # the end: the failure counted and named (layers still queued when the chord gave up
    # are counted as such by the summary line checked above)
    # layers revoked when the export failed are cancelled, not failures of their own
    summary = rf"^layers .* \d+/{LAYERS}\b.*, 1 failed(, \d+ cancelled)?$"
    assert re.search(summary, final, re.M), final
    assert "error: export " in final and bad.digest in final
    assert "does not match" in final


def test_local_source_mistakes_are_refused_before_enqueueing(
    env: dict[str, str],
    source_root: Path,
    tmp_path: Path,
    bucket: str,
    redis_server: ServerProcess,
) -> None:
    target = f"type=s3,bucket={bucket}"
    elsewhere = write_sample_cache(tmp_path / "elsewhere", [10_000], seed=8).path
    outside = cli("export", "--from", f"type=local,src={elsewhere}", "--to", target, env=env)
    assert outside.returncode == 2
    assert outside.stderr.strip() == (
        f"error: --from: source.src: {elsewhere} is outside CACHESHIP_SOURCE_ROOTS "
        f"({source_root}): local caches are only read under these directories"
    )
    missing = cli(
        "export", "--from", f"type=local,src={source_root / 'nope'}", "--to", target, env=env
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"error: --from: source.src: {source_root / 'nope'} does not exist"
    )
    (source_root / "not-a-cache" / "blobs").mkdir(parents=True)
    not_cache = cli(
        "export", "--from", f"type=local,src={source_root / 'not-a-cache'}", "--to", target,
        env=env,
    )
    assert not_cache.returncode == 2
    assert "is not a BuildKit cache: it has no index.json" in not_cache.stderr
    assert f"--cache-to type=local,dest={source_root / 'not-a-cache'}" in not_cache.stderr
    # nothing was enqueued
    conn = redis.Redis.from_url(redis_server.url)
    assert conn.keys("cacheship-submitted-*") == []
    assert conn.llen("cacheship") == 0


def test_refusals_are_one_warning_line_in_the_workers_log(
    env: dict[str, str],
    source_root: Path,
    tmp_path: Path,
    bucket: str,
    workers: Callable[..., Worker],
    redis_server: ServerProcess,
) -> None:
    worker = workers(env)
    client = Client(redis_server.url)
    target: dict[str, Any] = {"type": "s3", "bucket": bucket}
    # A CLI elsewhere cannot check: the worker's refusal names the setting and the roots.
    elsewhere = write_sample_cache(tmp_path / "elsewhere", [10_000], seed=9).path
    with pytest.raises(ExportError) as outside:
        client.wait(
            client.submit({"source": {"type": "local", "src": str(elsewhere)}, "target": target}),
            timeout=120,
        )
    assert str(outside.value) == (
        f"source.src: {elsewhere} is outside CACHESHIP_SOURCE_ROOTS ({source_root}): "
        "local caches are only read under these directories"
    )
    (source_root / "empty").mkdir()
    with pytest.raises(ExportError, match=r"is not a BuildKit cache: it has no index\.json"):
        client.wait(
            client.submit(
                {"source": {"type": "local", "src": str(source_root / "empty")}, "target": target}
            ),
            timeout=120,
        )
    # A layer failing inside the chord: the layer task and the chord each say it once.
    cache = write_sample_cache(source_root / "app", [20_000, 30_000], seed=10)
    corrupt(cache.path, cache.layers[1].digest)
    with pytest.raises(ExportError, match="does not match"):
        client.wait(
            client.submit({"source": {"type": "local", "src": str(cache.path)}, "target": target}),
            timeout=120,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and worker.log().count(" refused: ") < 4:
        time.sleep(0.2)
    log = worker.log()
    refused = [line for line in log.splitlines() if " refused: " in line]
    assert len(refused) >= 4, log
    assert all("WARNING" in line for line in refused), refused
    assert any(
        f"] export {elsewhere} → " in line and "CACHESHIP_SOURCE_ROOTS" in line
        for line in refused
    ), refused
    assert any(cache.layers[1].digest in line for line in refused), refused
    assert "raised unexpected" not in log
    assert "Traceback" not in log


def _calls(conn: redis.Redis) -> dict[str, int]:
    stats = conn.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_a_poll_costs_the_same_round_trips_whatever_the_number_of_finished_layers(
    env: dict[str, str],
    source_root: Path,
    bucket: str,
    workers: Callable[..., Worker],
    redis_server: ServerProcess,
) -> None:
    cache = write_sample_cache(source_root / "poll", [5000 + i for i in range(60)], seed=12)
    workers(env, concurrency=2)
    client = Client(redis_server.url)
    export_id = client.submit(
        {
            "source": {"type": "local", "src": str(cache.path)},
            "target": {"type": "s3", "bucket": bucket},
        }
    )
    client.wait(export_id, timeout=300)
    conn = redis.Redis.from_url(redis_server.url)
    watcher = Client(redis_server.url)
    watcher.snapshot(export_id)  # connected
    # The counts are the server's: the workers' own traffic (the export's last writes, lease
    # renewals) may fall into a window. A window with any command the snapshot does not send
    # is measured again; the snapshot's own GETs count in every window.
    for _ in range(10):
        before = _calls(conn)
        first = watcher.snapshot(export_id)
        middle = _calls(conn)
        second = watcher.snapshot(export_id)
        after = _calls(conn)
        grew = {k: middle.get(k, 0) - before.get(k, 0) for k in middle}
        grew = {k: v for k, v in grew.items() if v and k != "info"}
        again = {k: after.get(k, 0) - middle.get(k, 0) for k in after}
        again = {k: v for k, v in again.items() if v and k != "info"}
        if set(grew) <= {"get", "mget", "hmget"} and set(again) <= {"get", "mget", "hmget"}:
            break
        time.sleep(1)
    assert [s.state for s in first.steps] == [s.state for s in second.steps]
    assert sum(1 for s in second.steps if s.status == "uploaded") == 60
    # the export has ended: its state, submission, ledger and late ledger in one round trip,
    # and no layer's own result is read (the ledger says what each did)
    assert not grew.get("mget") and not grew.get("hmget"), grew
    assert grew == {"get": 4}, grew
    assert again == {"get": 4}, again
