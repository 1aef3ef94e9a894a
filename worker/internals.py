"""Everything cacheship relies on inside Celery, kombu, redis-py's pool and prometheus_client.

The fleet design leans on a few things those libraries do not promise: how kombu's Redis
transport keeps queued and fetched messages, what a Celery task message (protocol 2) and a
stored task result look like, where the result backend keeps its Redis client, how
prometheus_client picks its value storage. Each is used here and nowhere else, and
``tests/integration/test_internals.py`` (with ``test_enqueue.py`` for the message) checks
every one against the installed versions: an upgrade that changes any of them fails those
tests by name instead of breaking leases, the watchdog or enqueueing silently.

Nothing here imports Celery, kombu or redis at module level: the command line imports this
module to enqueue and must start in a fraction of a second.

The task message: ``cacheship export`` must return in a fraction of a second, and importing
Celery, kombu and the transport costs about 0.1 s before the first byte is sent. The message
is the one ``app.send_task`` writes for a direct queue (anonymous exchange, the queue's name
as routing key): same headers, body and properties, so any ``celery worker`` consumes it.
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


# --------------------------------------------------------------------------- result backend


def backend_redis(backend: Any) -> Any:
    """The Redis client of Celery's Redis result backend (its ``client`` attribute); None for
    another backend."""
    return getattr(backend, "client", None)


def result_key(backend: Any, task_id: str) -> str:
    """The key under which the Redis result backend keeps a task's state."""
    key = backend.get_key_for_task(task_id)
    return key.decode() if isinstance(key, bytes) else str(key)


def decode_meta(backend: Any, raw: bytes | str | None) -> dict[str, Any] | None:
    """A stored state as the backend reads it (``status``, ``result``...); None if absent."""
    if not raw:
        return None
    meta: dict[str, Any] = backend.decode_result(raw)
    return meta


def store_success(pipe: Any, backend: Any, task_id: str, result: Any, done_at: str) -> None:
    """Queue in ``pipe`` what the backend stores (and publishes) for a task that succeeded.

    For layers found stored, which get no task: written in one pipeline with the others, where
    ``backend.store_result`` would cost a round trip each.
    """
    meta: dict[str, Any] = {  # the fields Celery's Redis backend stores for a finished task
        "status": "SUCCESS",
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": done_at,
        "task_id": task_id,
    }
    key, value = result_key(backend, task_id), backend.encode(meta)
    if backend.expires:
        pipe.set(key, value, ex=int(backend.expires))
    else:
        pipe.set(key, value)
    pipe.publish(key, value)


def set_patience(client: Any, patience: float) -> None:
    """Make ``client`` (every connection of its pool) retry a refused or timed-out command for
    about ``patience`` seconds (a Redis restart), with a backoff capped at 2 s.

    The backend's client is Celery's attribute; the retry is redis-py's public ``set_retry``,
    whose default errors are connection errors and timeouts.
    """
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    cap = 2.0
    client.set_retry(Retry(ExponentialBackoff(cap=cap, base=0.1), max(1, int(patience / cap) + 4)))


# --------------------------------------------------------------------------- kombu's Redis layout


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps one queue in: the queue's name, then one per priority step."""
    from kombu.transport.redis import Channel

    return [queue] + [f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps if step]


def unacked_key() -> str:
    """The hash of fetched, unacknowledged messages (delivery tag -> message)."""
    from kombu.transport.redis import Channel

    return str(Channel.unacked_key)


def held_tag(request: Any) -> str | None:
    """The delivery tag of a message a worker received; None once acknowledged."""
    if request.acknowledged:
        return None
    tag = request.message.delivery_tag
    return str(tag) if tag is not None else None


def rescore_held(channel: Any, pipe: Any, tags: dict[str, float]) -> None:
    """Queue in ``pipe`` the renewal of the leases of these held messages.

    kombu scores each fetched message by its delivery time in a sorted set; any worker puts
    back those scored older than the visibility timeout. ``XX``: only messages still
    unacknowledged; an acknowledged one must not come back.
    """
    pipe.zadd(channel.unacked_index_key, tags, xx=True)


def channel_redis(channel: Any) -> Any:
    """The redis-py client of a kombu Redis channel."""
    return channel.client


def message_task_id(raw: Any) -> str | None:
    try:
        message = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if isinstance(message, list) and message:  # unacked entries: [message, exchange, key]
        message = message[0]
    if not isinstance(message, dict):
        return None
    headers = message.get("headers")
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return str(task_id) if task_id else None


def queued_task_ids(client: Any, queue: str) -> set[str]:
    """Ids of the task messages waiting in ``queue`` (every priority list)."""
    found: set[str] = set()
    for name in queue_lists(queue):
        for raw in client.lrange(name, 0, -1):
            task_id = message_task_id(raw)
            if task_id:
                found.add(task_id)
    return found


def held_task_ids(client: Any) -> set[str]:
    """Ids of the task messages fetched by some worker and not acknowledged yet (running,
    reserved, or waiting for a retry's countdown)."""
    found: set[str] = set()
    for raw in client.hvals(unacked_key()):
        task_id = message_task_id(raw)
        if task_id:
            found.add(task_id)
    return found


# --------------------------------------------------------------------------- prometheus_client


def use_multiprocess_values() -> None:
    """Make prometheus_client store new metrics' values in the multiprocess directory.

    It picks its value class when first imported, from ``PROMETHEUS_MULTIPROC_DIR``; when it
    was imported before the variable was set, pick again (metrics made later use it).
    """
    from prometheus_client import values

    untyped: Any = values
    if not getattr(untyped.ValueClass, "_multiprocess", False):
        untyped.ValueClass = untyped.get_value_class()


def multiprocess_values() -> bool:
    """True when new metrics' values go to the multiprocess directory."""
    from prometheus_client import values

    untyped: Any = values
    return bool(getattr(untyped.ValueClass, "_multiprocess", False))
