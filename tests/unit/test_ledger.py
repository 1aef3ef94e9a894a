"""The ended export's ledger: one short line per layer, read back exactly."""

from __future__ import annotations

import uuid

import pytest

from tasks import ledger
from tasks.jobs.export import derived_id
from tasks.ledger import LayerEnd

EXPORT = "5b0c3f0e-8e0e-4c55-9a3e-3d2a1f6b7c11"
OTHERS = [
    {"name": "writing config sha256:" + "c" * 64, "task_id": EXPORT, "kind": "config",
     "digest": "sha256:" + "c" * 64, "size": 1234},
    {"name": "writing cache manifest sha256:" + "d" * 64, "task_id": EXPORT,
     "kind": "manifest", "digest": "sha256:" + "d" * 64, "size": 567},
]


def _digest(i: int) -> str:
    return f"sha256:{i:064x}"


def test_every_kind_of_end_reads_back() -> None:
    ends = [
        LayerEnd(_digest(1), 3 * 1024 * 1024, "SUCCESS", "uploaded", 3 * 1024 * 1024, 1024),
        LayerEnd(_digest(2), 10, "SUCCESS", "skipped"),
        LayerEnd(_digest(3), 11, "SUCCESS", "touched"),
        LayerEnd(_digest(4), 12, "FAILURE", error="writing layer x: content does not\nmatch"),
        LayerEnd(_digest(5), 13, "REVOKED"),
        LayerEnd(_digest(6), 14, "STARTED"),
        LayerEnd("blake3:" + "e" * 64, 15, "SUCCESS", "uploaded", 15),
    ]
    decoded = ledger.decode(ledger.encode(OTHERS, ends).encode())
    assert decoded.other_steps == OTHERS
    expected = list(ends)
    one_line = "writing layer x: content does not match"
    expected[3] = LayerEnd(_digest(4), 12, "FAILURE", error=one_line)
    assert decoded.layers == expected


def test_steps_and_outcomes_are_those_the_export_announced() -> None:
    ends = [
        LayerEnd(_digest(1), 100, "SUCCESS", "uploaded", 100),
        LayerEnd(_digest(2), 7, "REVOKED"),
    ]
    decoded = ledger.decode(ledger.encode(OTHERS, ends))
    steps = decoded.steps(EXPORT)
    assert [s["kind"] for s in steps] == ["layer", "layer", "config", "manifest"]
    assert steps[0] == {
        "name": f"writing layer {_digest(1)}",
        "task_id": derived_id(EXPORT, _digest(1)),
        "kind": "layer",
        "digest": _digest(1),
        "size": 100,
    }
    assert decoded.outcomes() == {
        _digest(1): {"action": "uploaded", "bytes_sent": 100, "bytes_resumed": 0}
    }


def test_a_late_line_overrides_the_fold_and_keeps_the_order() -> None:
    folded = [LayerEnd(_digest(1), 5, "STARTED"), LayerEnd(_digest(2), 6, "REVOKED")]
    body = ledger.encode(OTHERS, folded)
    late = ledger.line(LayerEnd(_digest(1), 5, "SUCCESS", "uploaded", 5))
    decoded = ledger.decode(body, late)
    assert [(e.digest, e.state, e.action) for e in decoded.layers] == [
        (_digest(1), "SUCCESS", "uploaded"),
        (_digest(2), "REVOKED", None),
    ]


def test_a_line_stays_well_under_200_bytes() -> None:
    terabyte = 10**12
    worst = LayerEnd(_digest(2**200), terabyte, "SUCCESS", "uploaded", terabyte, terabyte)
    assert len(ledger.line(worst)) <= 110
    error = LayerEnd(_digest(1), 1, "FAILURE", error="x" * 5000)
    assert len(ledger.line(error)) <= 90 + ledger.ERROR_CHARS


def test_the_derived_ids_are_the_exports() -> None:
    for what in (_digest(9), "finalize", "layers"):
        assert ledger.derived_id(EXPORT, what) == derived_id(EXPORT, what)
    assert uuid.UUID(ledger.derived_id(EXPORT, "layers"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json\n", "ledger header"),
        ('{"v": 99}\n', "not format 1"),
        ('{"v": 1}\nXX abc 1 2 3\n', "ledger line 2"),
        ('{"v": 1}\nSu abc one 2 3\n', "sizes are not numbers"),
    ],
)
def test_what_is_not_a_ledger_is_refused_by_line(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ledger.decode(raw)


def test_the_running_mark_finds_only_a_running_line() -> None:
    folded = [LayerEnd(_digest(1), 5, "STARTED"), LayerEnd(_digest(2), 6, "REVOKED")]
    body = ledger.encode(OTHERS, folded)
    assert ledger.running_mark(_digest(1)) in body
    assert ledger.running_mark(_digest(2)) not in body
    assert ledger.running_mark(_digest(3)) not in body
