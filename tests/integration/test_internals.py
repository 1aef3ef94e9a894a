"""Contracts of ``worker/internals.py``: what cacheship relies on inside its libraries.

Each test pins one thing the installed Celery, kombu, redis-py or prometheus_client does that
they do not promise, against a real Redis-protocol server. An upgrade that changes any of
them fails here, by name, instead of silently breaking leases, the watchdog, the Flower rows
of skipped layers or the metrics. (The hand-built task message has its own contract test:
``test_enqueue.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Consumer, Queue

from tasks.settings import Settings
from tests.stack import REPO
from worker import internals
from worker.app import configure
from worker.embedded import ServerProcess, free_port, start_redis

QUEUE = "contract"


@pytest.fixture
def app(redis_server: ServerProcess) -> Iterator[Celery]:
    made = Celery("contract", set_as_current=False)
    configure(made, Settings(redis_url=redis_server.url, queue=QUEUE))
    yield made
    made.close()


def test_queued_task_ids_reads_kombus_queue_lists(app: Celery, redis_server: ServerProcess) -> None:
    plain, urgent = str(uuid.uuid4()), str(uuid.uuid4())
    app.send_task("cacheship.export", args=[{}], task_id=plain, queue=QUEUE)
    app.send_task("cacheship.export", args=[{}], task_id=urgent, queue=QUEUE, priority=5)
    conn = redis.Redis.from_url(redis_server.url)
    lists = internals.queue_lists(QUEUE)
    assert lists[0] == QUEUE
    assert sum(conn.llen(name) for name in lists) == 2, "kombu keeps queues elsewhere now"
    assert internals.queued_task_ids(conn, QUEUE) == {plain, urgent}


def test_held_task_ids_and_lease_renewal_follow_kombus_unacked_set(
    app: Celery, redis_server: ServerProcess
) -> None:
    task_id = str(uuid.uuid4())
    app.send_task("cacheship.copy_layer", args=["x"], task_id=task_id, queue=QUEUE)
    conn = redis.Redis.from_url(redis_server.url)
    received = []
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        with Consumer(channel, [Queue(QUEUE)], callbacks=[lambda b, m: received.append(m)]):
            deadline = time.monotonic() + 10
            while not received and time.monotonic() < deadline:
                connection.drain_events(timeout=1)
        assert received, "nothing delivered"
        message = received[0]
        # Fetched, not acknowledged: in the unacked hash, scored in the index by delivery time.
        assert internals.queued_task_ids(conn, QUEUE) == set()
        assert internals.held_task_ids(conn) == {task_id}
        tag = str(message.delivery_tag)
        index = channel.unacked_index_key
        before = conn.zscore(index, tag)
        assert before is not None, "kombu no longer scores held messages in unacked_index"
        later = float(before) + 1000
        with internals.channel_redis(channel).pipeline() as pipe:
            internals.rescore_held(channel, pipe, {tag: later})
            pipe.execute()
        assert conn.zscore(index, tag) == later
        message.ack()
        assert internals.held_task_ids(conn) == set()
        with internals.channel_redis(channel).pipeline() as pipe:
            internals.rescore_held(channel, pipe, {tag: later + 1})
            pipe.execute()
        assert conn.zscore(index, tag) is None, "an acknowledged message came back"


def test_a_celery_request_says_whether_it_is_acknowledged_and_its_delivery_tag() -> None:
    from celery.worker.request import Request
    from kombu.message import Message

    assert Request.acknowledged is False  # a class default, set True once acknowledged
    assert isinstance(Request.message, property)
    assert "delivery_tag" in Message.__init__.__code__.co_varnames
    for method in ("acknowledge", "reject"):
        source = getattr(Request, method).__code__.co_names
        assert "acknowledged" in source, f"Request.{method} no longer sets acknowledged"


def test_store_success_writes_what_the_backend_reads_as_success(app: Celery) -> None:
    backend = app.backend
    client = internals.backend_redis(backend)
    assert isinstance(client, redis.Redis)
    ours, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    result = {"digest": "sha256:" + "a" * 64, "size": 3, "action": "skipped"}
    pubsub = client.pubsub()
    pubsub.subscribe(internals.result_key(backend, ours))
    pubsub.get_message(timeout=1)
    with client.pipeline() as pipe:
        internals.store_success(pipe, backend, ours, result, datetime.now(UTC).isoformat())
        pipe.execute()
    backend.store_result(theirs, result, "SUCCESS")
    stored = app.AsyncResult(ours)
    assert stored.state == "SUCCESS"
    assert stored.result == result
    published = pubsub.get_message(timeout=2)
    assert published is not None and published["type"] == "message"
    pubsub.close()
    mine = internals.decode_meta(backend, client.get(internals.result_key(backend, ours)))
    celery_own = internals.decode_meta(
        backend, client.get(internals.result_key(backend, theirs))
    )
    assert mine is not None and celery_own is not None
    assert set(mine) <= set(celery_own), set(mine) - set(celery_own)
    assert {k: mine[k] for k in ("status", "result", "traceback")} == {
        k: celery_own[k] for k in ("status", "result", "traceback")
    }
    assert not mine["children"] and not celery_own["children"]
    assert client.ttl(internals.result_key(backend, ours)) > 0
    assert internals.decode_meta(backend, None) is None


def test_set_patience_retries_a_refused_connection_until_redis_is_back() -> None:
    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    internals.set_patience(client, 1.0)
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert time.monotonic() - began >= 1.0, "gave up before its patience"

    internals.set_patience(client, 30.0)
    import threading

    started: list[ServerProcess] = []
    later = threading.Timer(2.0, lambda: started.append(start_redis(port=port)))
    later.start()
    try:
        began = time.monotonic()
        assert client.ping()
        assert time.monotonic() - began >= 1.5
    finally:
        later.join()
        for server in started:
            server.stop()


def test_prometheus_values_switch_to_the_multiprocess_directory(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "import prometheus_client\n"  # imported before the directory is set
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
        "from worker import internals\n"
        "assert not internals.multiprocess_values()\n"
        "internals.use_multiprocess_values()\n"
        "assert internals.multiprocess_values()\n"
        "prometheus_client.Counter('contract_total', 'x').inc()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.glob("counter_*.db")), "values are not written to the directory"


def test_kombu_unacked_entries_carry_the_task_message_first() -> None:
    entry = json.dumps([{"headers": {"id": "abc"}, "body": ""}, "", QUEUE])
    assert internals.message_task_id(entry) == "abc"
    assert internals.message_task_id(json.dumps({"headers": {"id": "def"}})) == "def"
    assert internals.message_task_id("not json") is None
