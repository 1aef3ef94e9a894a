"""The benchmark runs end to end in ``--quick`` mode; only the shape of its output is checked.

Timings are never asserted: the numbers belong to ``python -m bench`` runs, not to tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert [row["scenario"][0] for row in rows] == ["1", "2", "3", "4", "5", "6", "7", "8"]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["scenario"] in run.stdout
    for row in rows[:5]:
        assert isinstance(row["cacheship"], float)
        assert isinstance(row["baseline"], float)
        assert isinstance(row["pass"], bool)
    warm = rows[2]
    assert warm["detail"]["bytes_sent"] == [0]
    scale = rows[4]
    assert set(scale["detail"]["redis_growth_bytes"]) == {"5", "10", "20"}
    memory = rows[3]
    assert memory["unit"] == "MiB"
    assert memory["detail"]["hwm_max"] > 0
    pruned = rows[6]
    assert pruned["detail"]["report"]["blobs_removed"] == 270
    # Nothing is left behind: the scratch directory is removed.
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
