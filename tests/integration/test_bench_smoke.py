"""The benchmark runs end to end in ``--quick`` mode; only the shape of its output is checked.

Timings are never asserted: the numbers belong to ``python -m bench`` runs, not to tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.stack import REPO

ROW_KEYS = {
    "scenario",
    "unit",
    "cacheship",
    "baseline",
    "ratio",
    "target",
    "pass",
    "notes",
    "detail",
}


@pytest.mark.slow(seconds=70)
def test_quick_benchmark_prints_the_table_and_writes_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--server",
            "moto",
            "--json",
            str(out),
            "--scratch",
            str(tmp_path),
            "--rtt-ms",
            "5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    header = run.stdout.splitlines()[0]
    for column in ("scenario", "cacheship", "baseline", "ratio", "target", "result"):
        assert column in header
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert results["server"] == "moto"
    assert {"cpus", "cpu_model", "memory_gib", "python"} <= set(results["machine"])
    assert results["conditions"] == ["loopback", "5 ms"]
    every = results["rows"]
    for each in every:
        assert set(each) == ROW_KEYS
        assert each["scenario"] in run.stdout
    numbers = {
        condition: " ".join(
            r["scenario"].split()[0] for r in every if r["scenario"].endswith(f"[{condition}]")
        )
        for condition in results["conditions"]
    }
    # The format benchmark never talks to S3: it runs under the first condition only.
    assert numbers == {
        "loopback": "1 2 3 4 4 5 6 6 7 8 9 9 9 9 9 9 0 0 0 10 10 11 11 11 11",
        "5 ms": "1 2 3 4 4 5 7 8 9 9 9 9 9 9 0 0 0 10 10",
    }
    rows = [r for r in every if r["scenario"].endswith("[loopback]")]

    def row(prefix: str, among: list[dict[str, Any]] = rows) -> dict[str, Any]:
        [found] = [r for r in among if r["scenario"].startswith(prefix)]
        return found

    timed = ["1 big", "2 small", "3 warm", "5 scale"]
    delayed = [r for r in every if r["scenario"].endswith("[5 ms]")]
    for name in ("9 vs BuildKit: mode=max", "10 fleet"):
        for among in (rows, delayed):
            found = [r for r in among if r["scenario"].startswith(name)]
            assert found and all(isinstance(r["cacheship"], float) for r in found), name
    # Without --buildkit-exporter the raw client stands in: no verdict against BuildKit.
    big = row("9 vs BuildKit: big 2x6 MiB, empty")
    assert big["detail"]["peer"] == "raw" and big["pass"] is None
    assert isinstance(big["cacheship"], float) and isinstance(big["baseline"], float)
    for name in timed:
        assert isinstance(row(name)["cacheship"], float), name
        assert isinstance(row(name)["baseline"], float), name
        assert isinstance(row(name)["pass"], bool), name
    assert row("3 warm")["detail"]["bytes_sent"] == [0]
    assert set(row("5 scale")["detail"]["redis_growth_bytes"]) == {"5", "10", "20"}
    memory = row("4 memory, one")
    assert memory["unit"] == "MiB"
    assert memory["detail"]["hwm_max"] > 0
    assert row("4 memory, whole worker idle")["cacheship"] > 0
    assert row("7 prune")["detail"]["report"]["blobs_removed"] == 270
    enqueue = row("0 CLI enqueue")
    assert isinstance(enqueue["cacheship"], float) and enqueue["cacheship"] > 0
    # Nothing is left behind: the scratch directory is removed.
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_the_delay_line_adds_its_round_trip_and_keeps_every_byte() -> None:
    """Through ``bench.delay`` a request-answer exchange takes at least the round trip; bytes
    arrive whole and in order, both ways."""
    import socket
    import threading
    import time

    from bench import delay

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    line = delay.start(f"http://127.0.0.1:{port}", rtt_ms=80)
    try:
        host, relay_port = line.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(relay_port))) as conn:
            payload = bytes(range(256)) * 4096  # 1 MiB
            started = time.monotonic()
            conn.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                got += conn.recv(65536)
            took = time.monotonic() - started
            assert bytes(got) == payload
            # The handshake's round trip plus the request's: at least two round trips.
            assert took >= 0.16, took
            started = time.monotonic()
            conn.sendall(b"ping")
            assert conn.recv(16) == b"ping"
            assert 0.08 <= time.monotonic() - started < 2.0
    finally:
        line.stop()
        listener.close()
