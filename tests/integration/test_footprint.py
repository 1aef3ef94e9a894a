"""What an ended export keeps in Redis: a small fixed part and one short line per layer.

Real Valkey, real S3 server over HTTP, real workers whose layer results expire two seconds
after the end (``CACHESHIP_LAYER_RESULTS_EXPIRES``); the keys are those the export created,
sized with ``MEMORY USAGE`` (``bench/footprint.py``). After they expired, ``cacheship status``
and the Python client must still say what happened to every layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.footprint import Footprint, bound, key_names, measure
from tasks import ledger
from tasks.fleet.flight import lock_key
from tasks.ledger import derived_id, late_key, ledger_key
from tests.stack import Worker
from worker.client import Client, ExportError
from worker.embedded import ServerProcess
from worker.samplecache import write_sample_cache

SHORT = 2
CACHESHIP = [sys.executable, "-m", "worker.cli"]


def _status_json(export_id: str, env: dict[str, str]) -> dict[str, Any]:
    """``cacheship status --json`` in its own process, as an operator runs it."""
    run = subprocess.run(
        [*CACHESHIP, "status", "--json", export_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    document: dict[str, Any] = json.loads(run.stdout)
    return document


def _expired(
    db: redis.Redis, before: set[str], export_id: str, digests: list[str], timeout: float = 30.0
) -> Footprint:
    """The export's keys once its layers' results are gone and nothing short-lived is left.

    The results are shortened just after the export's final state is stored (what a
    waiting client sees first): wait for them to go, however long the end takes.
    """
    deadline = time.monotonic() + timeout
    while _layer_keys(db, export_id, digests) and time.monotonic() < deadline:
        time.sleep(0.5)
    while True:
        found = measure(db, key_names(db) - before, SHORT)
        if not found.transient() or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _layer_keys(db: redis.Redis, export_id: str, digests: list[str]) -> list[str]:
    """Layer task results (and the chord's) still in Redis."""
    ids = [derived_id(export_id, d) for d in digests]
    ids += [derived_id(export_id, "finalize"), derived_id(export_id, "layers")]
    return [name for name in key_names(db) if any(i in name for i in ids)]


def test_an_ended_export_keeps_a_line_per_layer_and_still_tells_each(
    redis_server: ServerProcess,
    env: dict[str, str],
    source_root: Path,
    bucket: str,
    s3: Any,
    workers: Callable[..., Worker],
) -> None:
    cache = write_sample_cache(source_root / "app", [3000 + 211 * i for i in range(24)], seed=21)
    workers({**env, "CACHESHIP_LAYER_RESULTS_EXPIRES": str(SHORT)}, concurrency=2)
    client = Client(redis_server.url)
    request = {"source": {"type": "local", "src": str(cache.path)},
               "target": {"type": "s3", "bucket": bucket}}
    client.wait(client.submit(request), timeout=120)
    # Half the blobs go missing: the next export uploads those and finds the others stored.
    gone = [d.digest for d in cache.layers[::2]]
    for digest in gone:
        s3.delete_object(Bucket=bucket, Key=f"blobs/{digest}")
    db = redis.Redis.from_url(redis_server.url)
    before = key_names(db)

    export_id = client.submit(request)
    result = client.wait(export_id, timeout=120)
    assert (result["layers_uploaded"], result["layers_skipped"]) == (12, 12)
    digests = [d.digest for d in cache.layers]
    found = _expired(db, before, export_id, digests)

    layers = len(cache.layers)
    assert not found.transient(), found.transient()
    assert found.kept_bytes <= bound(layers), found.by_kind(found.keys)
    assert _layer_keys(db, export_id, digests) == []
    results = [k.name for k in found.keys if k.name.startswith("celery-task-meta-")]
    assert results == [f"celery-task-meta-{export_id}"], "only the export's own result is kept"
    assert db.exists(ledger_key(export_id))

    # A client that never saw the export running, and the command line, read it back.
    fresh = Client(redis_server.url)
    snap = fresh.snapshot(export_id)
    assert snap.state == "SUCCESS"
    steps = {s.digest: s for s in snap.steps if s.kind == "layer"}
    assert list(steps) == digests
    for digest, step in steps.items():
        assert step.state == "SUCCESS"
        assert step.status == ("uploaded" if digest in gone else "skipped"), digest
        assert step.task_id == derived_id(export_id, digest)
        assert step.bytes_done == step.size
    assert [s.kind for s in snap.steps[-2:]] == ["config", "manifest"]
    assert all(s.status == "done" for s in snap.steps[-2:])

    document = _status_json(export_id, {**env, "CACHESHIP_REDIS_URL": redis_server.url})
    assert document["state"] == "SUCCESS"
    by_digest = {s["digest"]: s for s in document["steps"] if s["kind"] == "layer"}
    assert {d: s["status"] for d, s in by_digest.items()} == {
        d: "uploaded" if d in gone else "skipped" for d in digests
    }
    assert document["result"]["layers_uploaded"] == 12
    # The result as the worker returned it, steps included.
    again = fresh.wait(export_id, timeout=10)
    manifest = json.loads(again["cache.manifest"])["digest"]
    assert [s["digest"] for s in again["steps"]] == [*digests, again["config"], manifest]


def test_a_failed_export_keeps_what_each_layer_did_even_one_that_ended_after_it(
    redis_server: ServerProcess,
    env: dict[str, str],
    source_root: Path,
    bucket: str,
    workers: Callable[..., Worker],
) -> None:
    cache = write_sample_cache(source_root / "app", [5000 + 7 * i for i in range(12)], seed=5)
    # The first layer waits for another writer of its blob (this test holds the fleet's
    # lock on it) while the second, corrupted, fails the export: it ends after its export.
    slow, bad = cache.layers[0].digest, cache.layers[1].digest
    path = cache.path / "blobs" / "sha256" / bad.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[100] ^= 0x5A
    path.write_bytes(bytes(data))
    db = redis.Redis.from_url(redis_server.url)
    other_writer = db.lock(lock_key(bucket, f"blobs/{slow}"), timeout=120)
    assert other_writer.acquire(blocking=False)
    workers({**env, "CACHESHIP_LAYER_RESULTS_EXPIRES": str(SHORT)}, concurrency=2)
    client = Client(redis_server.url)
    before = key_names(db)
    export_id = client.submit(
        {"source": {"type": "local", "src": str(cache.path)},
         "target": {"type": "s3", "bucket": bucket}}
    )
    with pytest.raises(ExportError, match="does not match its digest"):
        client.wait(export_id, timeout=120)
    assert ledger.running_mark(slow) in db.get(ledger_key(export_id)).decode()
    other_writer.release()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        late = ledger.decode(db.get(ledger_key(export_id)), db.get(late_key(export_id)))
        if {e.digest: e.state for e in late.layers}[slow] != "STARTED":
            break
        time.sleep(0.2)
    assert {e.digest: e.state for e in late.layers}[slow] == "SUCCESS"
    found = _expired(db, before, export_id, [d.digest for d in cache.layers])

    layers = len(cache.layers)
    assert not found.transient(), found.transient()
    assert found.kept_bytes <= bound(layers), found.by_kind(found.keys)
    assert _layer_keys(db, export_id, [d.digest for d in cache.layers]) == []
    assert not db.exists(f"cacheship-plan-{export_id}")

    snap = Client(redis_server.url).snapshot(export_id)
    assert snap.state == "FAILURE" and "does not match its digest" in (snap.error or "")
    steps = {s.digest: s for s in snap.steps if s.kind == "layer"}
    assert list(steps) == [d.digest for d in cache.layers]
    assert (steps[slow].state, steps[slow].status) == ("SUCCESS", "uploaded")
    assert steps[bad].state == "FAILURE"
    assert "does not match its digest" in (steps[bad].error or "")
    others = [steps[d.digest].state for d in cache.layers[2:]]
    assert set(others) <= {"REVOKED", "SUCCESS"} and "REVOKED" in others

    document = _status_json(export_id, {**env, "CACHESHIP_REDIS_URL": redis_server.url})
    assert document["state"] == "FAILURE"
    states = {s["digest"]: (s["state"], s["status"]) for s in document["steps"]}
    assert states[slow] == ("SUCCESS", "uploaded")
    assert states[bad] == ("FAILURE", "failed")
    assert [states[d.digest][0] for d in cache.layers[2:]] == others
