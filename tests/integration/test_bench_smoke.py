"""The benchmark runs end to end in ``--quick`` mode; only the shape of its output is checked.

Timings are never asserted: the numbers belong to ``python -m bench`` runs, not to tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    header = run.stdout.splitlines()[0]
    for column in ("scenario", "cacheship", "baseline", "ratio", "target", "result"):
        assert column in header
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert results["server"] == "moto"
    assert {"cpus", "cpu_model", "memory_gib", "python"} <= set(results["machine"])
    rows = results["rows"]
    numbers = " ".join(r["scenario"].split()[0] for r in rows)
    assert numbers == "1 2 3 4 4 5 6 6 7 8 9 9 9 9 0 0 10 10 10 10"
    for each in rows:
        assert set(each) == ROW_KEYS
        assert each["scenario"] in run.stdout

    def row(prefix: str) -> dict[str, Any]:
        [found] = [r for r in rows if r["scenario"].startswith(prefix)]
        return found

    timed = ["1 big", "2 small", "3 warm", "5 scale", "9 vs BuildKit: small 12x64 KiB, empty"]
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
