"""The client reads every stored state, also one Celery would take for an exception."""

from __future__ import annotations

import json

from worker.client import Client


def test_a_revoked_state_stored_with_a_plain_result_is_read_as_stored() -> None:
    # What a layer that found its export cancelled stores (tasks/jobs/copy_layer.py).
    result = {"export_id": "e1", "status": "cancelled"}
    raw = json.dumps(
        {"status": "REVOKED", "result": result, "traceback": None, "children": [],
         "date_done": None, "task_id": "t1"}
    ).encode()
    meta = Client("redis://127.0.0.1:1/0")._decode(raw)
    assert meta["status"] == "REVOKED"
    assert meta["result"] == result
