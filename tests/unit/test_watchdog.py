"""What the watchdog decides for a stalled export (tasks/watchdog.py), from what Redis holds."""

from __future__ import annotations

from typing import Any

from tasks.watchdog import give_up_reason, review

FINALIZE = "fin"


def steps(n: int) -> list[dict[str, Any]]:
    layers = [
        {"name": f"writing layer sha256:{i}", "task_id": f"t{i}", "kind": "layer",
         "digest": f"sha256:{i}", "size": 1}
        for i in range(n)
    ]
    return [*layers, {"name": "writing config", "task_id": "e", "kind": "config",
                      "digest": "c", "size": 1}]


def test_layers_with_no_outcome_and_no_message_are_sent_again() -> None:
    got = review(steps(3), {"sha256:0"}, {}, FINALIZE, queued_ids=set(), held_ids={"t1"})
    assert [s["task_id"] for s in got.resend_layers] == ["t2"]
    assert not got.resend_finalize and got.fail is None and not got.queued
    assert got.missing == ["writing layer sha256:1", "writing layer sha256:2"]


def test_layers_waiting_in_the_queue_are_slow_not_stuck() -> None:
    got = review(steps(2), set(), {}, FINALIZE, queued_ids={"t0", "t1"}, held_ids=set())
    assert got.queued and not got.redrives


def test_every_layer_accounted_for_and_finalize_nowhere_sends_finalize() -> None:
    outcomes = {"sha256:0", "sha256:1"}
    got = review(steps(2), outcomes, {}, FINALIZE, set(), set())
    assert got.resend_finalize and not got.resend_layers
    held = review(steps(2), outcomes, {}, FINALIZE, set(), {FINALIZE})
    assert not held.redrives and not held.queued and held.missing == ["finalize"]


def test_a_failure_nobody_reported_fails_the_export_with_its_reason() -> None:
    states = {"t1": ("FAILURE", "KeyError: 'digest'")}
    got = review(steps(2), set(), states, FINALIZE, set(), set())
    assert got.fail == "writing layer sha256:1: KeyError: 'digest'"
    finalize_failed = review(
        steps(1), {"sha256:0"}, {FINALIZE: ("FAILURE", "boom")}, FINALIZE, set(), set()
    )
    assert finalize_failed.fail == "finalize: boom"


def test_a_layer_lost_to_an_outage_is_sent_again_not_failed() -> None:
    got = review(steps(1), set(), {"t0": ("LOST", None)}, FINALIZE, set(), set())
    assert got.fail is None and [s["task_id"] for s in got.resend_layers] == ["t0"]


def test_the_reason_names_what_is_missing() -> None:
    got = review(steps(5), set(), {}, FINALIZE, set(), set())
    reason = give_up_reason(got, 120, 3)
    assert reason.startswith("no progress for 120s after 3 re-drives; still missing: ")
    assert "writing layer sha256:0" in reason and reason.endswith("…")
