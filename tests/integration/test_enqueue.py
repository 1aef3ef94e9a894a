"""The client's hand-built task message is the one Celery's own ``send_task`` writes.

``Client.submit`` pushes the export's message with redis-py alone (the command line must not
wait for Celery's imports); a ``celery worker`` must take it as its own. Both messages go to
a queue no worker reads, on a real Redis-protocol server, and are compared field by field.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from celery import Celery

from tasks.request import parse_request
from tasks.settings import Settings
from worker.app import configure
from worker.client import EXPORT_TASK, Client, export_title, submitted_key
from worker.embedded import ServerProcess

REQUEST = {
    "source": {"type": "local", "src": "/srv/caches/app"},
    "target": {"type": "s3", "bucket": "ci-cache", "region": "eu-west-1", "name": "app;main"},
}


def _queued(conn: redis.Redis, queue: str) -> dict[str, Any]:
    raw = conn.lrange(queue, 0, -1)
    assert len(raw) == 1, f"one message in {queue}, found {len(raw)}"
    message: dict[str, Any] = json.loads(raw[0])
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_submit_writes_the_message_celery_writes(redis_server: ServerProcess) -> None:
    conn = redis.Redis.from_url(redis_server.url)
    export_id = Client(redis_server.url, queue="probe-client").submit(REQUEST)

    app = Celery("probe", set_as_current=False)
    configure(app, Settings(redis_url=redis_server.url, queue="probe-celery"))
    request = parse_request(REQUEST)
    body = request.model_dump(mode="json", by_alias=True)
    app.send_task(EXPORT_TASK, args=[body], task_id=export_id, shadow=export_title(request))

    ours, theirs = _queued(conn, "probe-client"), _queued(conn, "probe-celery")
    assert ours["body"] == theirs["body"]
    assert ours["body"][0] == [body]
    assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("body", "headers", "properties")
    }
    # The origin names the sending process; argsrepr is Celery's (depth-limited) repr.
    same_headers = set(theirs["headers"]) - {"origin", "argsrepr"}
    assert set(ours["headers"]) == set(theirs["headers"])
    assert {k: ours["headers"][k] for k in same_headers} == {
        k: theirs["headers"][k] for k in same_headers
    }
    assert ours["headers"]["shadow"] == "export /srv/caches/app → s3://ci-cache/ app;main"
    assert ours["headers"]["argsrepr"].startswith("[{'source': {'type': 'local'")
    assert set(ours["properties"]) == set(theirs["properties"])
    for key in ("correlation_id", "delivery_mode", "priority", "body_encoding"):
        assert ours["properties"][key] == theirs["properties"][key], key
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "probe-client"}
    assert theirs["properties"]["delivery_info"] == {"exchange": "", "routing_key": "probe-celery"}
    assert conn.ttl(submitted_key(export_id)) > 6 * 24 * 3600
    app.close()
    conn.close()
