"""``cacheship config normalize``: one line per input, exit 2 when any is invalid."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tasks.cacheformat import normalize
from worker.cli import main


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


VALID = {
    "layers": [
        {
            "blob": dg(1),
            "parent": -1,
            "annotations": {"mediaType": "m", "diffID": dg(2), "size": 1, "createdAt": None},
        }
    ],
    "records": [{"digest": dg(3), "layers": [{"layer": 0, "createdAt": "2024-01-01T00:00:00Z"}]}],
}
LOOPING = {"records": [{"digest": dg(3), "inputs": [[{"link": 0}]]}]}


def write(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def run(args: list[str], stdin: bytes | None = None) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["config", "normalize", *args], input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    return result.exit_code, result.output.splitlines()


def test_mixed_inputs_give_one_line_each_and_exit_2(tmp_path: Path) -> None:
    good = write(tmp_path, "good.json", json.dumps(VALID).encode())
    looping = write(tmp_path, "loop.json", json.dumps(LOOPING).encode())
    garbage = write(tmp_path, "garbage.json", b"\xff\x00{")
    code, lines = run([good, looping, str(tmp_path / "missing.json"), garbage, good])
    assert code == 2
    canonical = normalize(json.dumps(VALID).encode()).decode()
    assert lines == [
        canonical,
        f"error: {looping}: records[0].inputs[0][0].link: invalid looping record",
        f"error: {tmp_path / 'missing.json'}: No such file or directory",
        lines[3],
        canonical,
    ]
    assert lines[3].startswith(f"error: {garbage}: not JSON")


def test_all_valid_exits_0(tmp_path: Path) -> None:
    paths = [write(tmp_path, f"c{n}.json", json.dumps(VALID).encode()) for n in range(300)]
    code, lines = run(paths)
    assert code == 0
    assert len(lines) == 300
    assert set(lines) == {normalize(json.dumps(VALID).encode()).decode()}


def test_reads_standard_input() -> None:
    canonical = normalize(json.dumps(VALID).encode()).decode()
    assert run([], json.dumps(VALID).encode()) == (0, [canonical])
    assert run(["-"], json.dumps(VALID, indent=2).encode()) == (0, [canonical])
    code, lines = run(["-"], b"{} []")
    assert code == 2
    assert lines == ["error: <stdin>: unexpected data after the JSON value (line 1 column 4)"]


def test_error_lines_stay_on_one_line(tmp_path: Path) -> None:
    weird = write(tmp_path, "weird\nname.json", json.dumps({"layers": [{"blob": "a\nb"}]}).encode())
    code, lines = run([weird])
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "layers[0].blob: digest must be" in lines[0]


def test_empty_cache_still_normalises() -> None:
    value = {"records": [{"digest": dg(3)}]}
    assert run([], json.dumps(value).encode()) == (0, [json.dumps(value, separators=(",", ":"))])
