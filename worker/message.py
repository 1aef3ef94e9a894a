"""A Celery task message (protocol 2) as kombu's Redis transport keeps it in a queue.

Why by hand: ``cacheship export`` must return in a fraction of a second, and importing
Celery, kombu and the transport costs about 0.1 s before the first byte is sent. The message
is the one ``app.send_task`` writes for a direct queue (anonymous exchange, the queue's name
as routing key): same headers, body and properties, so any ``celery worker`` consumes it.
``tests/integration/test_enqueue.py`` compares the two field by field.

What it leaves out: the ``task-sent`` event (Flower shows the export from ``received``) and
the client's reply-to address, which only the RPC result backend reads.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

#: ``argsrepr``'s length in Celery's own messages (``Task.argsrepr_maxsize``).
ARGSREPR_MAX = 1024


def _shorten(text: str, limit: int = ARGSREPR_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def task_message(
    task: str, task_id: str, args: list[Any], queue: str, shadow: str | None = None
) -> dict[str, Any]:
    """The queue entry for ``task(*args)`` with id ``task_id`` (a JSON body, base64 encoded).

    ``shadow`` is the name logs and Flower show instead of the task's.
    """
    body = json.dumps(
        [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        separators=(",", ":"),
    )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": shadow,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": _shorten(repr(args)),
        "kwargsrepr": "{}",
        "origin": f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    return {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def encode(message: dict[str, Any]) -> str:
    """The text pushed onto the queue's Redis list."""
    return json.dumps(message, separators=(",", ":"))
