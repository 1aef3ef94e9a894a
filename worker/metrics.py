"""The worker's Prometheus endpoint: one per worker, right whatever the pool.

Celery's prefork pool copies layers in child processes that come and go; the threads pool
copies them in the worker's own process. Both are served the same way:

- before the task modules are imported (Celery's ``import_modules`` signal, in the main
  process, before the pool forks), prometheus_client is switched to its multiprocess mode
  in a fresh directory of this worker's own, so that every process (pool children
  included) writes its counters to files there;
- at ``worker_init`` the main process serves ``/metrics`` on ``CACHESHIP_METRICS_PORT``,
  summing those files at each scrape. Pool children close their inherited copy of the
  listening socket, and a child that died (even by SIGKILL) stops counting in the layers in
  flight: its live gauge file is dropped at the next scrape;
- the queue's depth is read from Redis at scrape time (``QueueCollector``), so it is fresh
  and costs nothing between scrapes.

The directory is new for every worker start, so a restarted worker starts its counters at 0,
which ``rate()`` and ``increase()`` handle as any counter reset. Nothing here imports
prometheus_client until metrics are switched on: the command line and Flower never pay for it.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from celery.signals import import_modules, worker_init, worker_process_init, worker_shutdown

from tasks.settings import Settings, get_settings
from worker import internals
from worker.internals import queue_lists

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A scrape must answer even when Redis does not: the queue read gives up after this long.
REDIS_TIMEOUT = 5.0

_state: dict[str, Any] = {}


class QueueCollector:
    """The queue as Redis holds it, read when Prometheus scrapes (one pipelined round trip).

    Every worker reports the same numbers: dashboards take ``max`` over workers, not ``sum``.
    """

    def __init__(self, redis_url: str, queue: str) -> None:
        self._url = redis_url
        self._queue = queue
        self._client: Any = None

    def _read(self) -> tuple[int, int]:
        from redis import Redis

        if self._client is None:
            self._client = Redis.from_url(
                self._url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
            )
        with self._client.pipeline(transaction=False) as pipe:
            for name in queue_lists(self._queue):
                pipe.llen(name)
            pipe.hlen(internals.unacked_key())
            *lengths, unacked = pipe.execute()
        return sum(int(n) for n in lengths), int(unacked)

    def _families(self, read: tuple[int, int] | None) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        waiting = GaugeMetricFamily(
            "cacheship_queue_messages",
            "Messages waiting in the queue (every priority), not fetched by any worker yet.",
            labels=["queue"],
        )
        unacked = GaugeMetricFamily(
            "cacheship_queue_unacked_messages",
            "Messages fetched by workers and not acknowledged yet (running or prefetched "
            "tasks, all queues of the Redis database).",
        )
        up = GaugeMetricFamily(
            "cacheship_broker_up", "1 when the queue could be read from Redis at this scrape."
        )
        if read is not None:
            waiting.add_metric([self._queue], read[0])
            unacked.add_metric([], read[1])
        up.add_metric([], 0 if read is None else 1)
        yield from (waiting, unacked, up)

    def describe(self) -> Iterable[Any]:
        return list(self._families(None))

    def collect(self) -> Iterable[Any]:
        try:
            read: tuple[int, int] | None = self._read()
        except Exception as exc:
            # Redis errors name the host and port, never the URL's password.
            logger.warning("metrics: cannot read queue %s: %s", self._queue, exc)
            read = None
        return list(self._families(read))


def forget_dead_processes(directory: Path) -> None:
    """Drop the live gauges (layers in flight) of pool processes that are gone.

    Counters and histograms of a dead process stay: they are part of the worker's totals.
    """
    from prometheus_client import multiprocess

    untyped: Any = multiprocess
    tails = {path.stem.rsplit("_", 1)[1] for path in directory.glob("gauge_live*_*.db")}
    for pid in {int(t) for t in tails if t.isdigit()} - {os.getpid()}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            untyped.mark_process_dead(pid, str(directory))
        except PermissionError:
            pass  # alive, someone else's: not ours to judge


class WorkerCollector:
    """Every process's values, summed from the multiprocess directory at each scrape."""

    def __init__(self, directory: Path) -> None:
        from prometheus_client import multiprocess

        untyped: Any = multiprocess
        self._directory = directory
        self._files: Any = untyped.MultiProcessCollector(None, str(directory))

    def collect(self) -> Iterable[Any]:
        forget_dead_processes(self._directory)
        files: Iterable[Any] = self._files.collect()
        return files


def prepare(settings: Settings) -> Path | None:
    """Put prometheus_client in multiprocess mode, in a new directory; ``None`` when off.

    Must run before ``tasks.metrics`` is imported: a metric takes its storage when it is
    created, so one made earlier would count in this process's memory only, unseen by the
    endpoint. That is checked rather than assumed.
    """
    if settings.metrics_port is None:
        return None
    if "dir" in _state:
        directory: Path = _state["dir"]
        return directory
    if "tasks.metrics" in sys.modules:
        raise RuntimeError(
            "CACHESHIP_METRICS_PORT: tasks.metrics was imported before the worker set up its "
            "metrics directory; pool processes' counts would be lost"
        )
    directory = Path(tempfile.mkdtemp(prefix="cacheship-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client may have been imported before (the variable was not set yet).
    internals.use_multiprocess_values()
    _state["dir"] = directory
    owner = os.getpid()
    atexit.register(lambda: _remove(directory) if os.getpid() == owner else None)
    return directory


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def start(settings: Settings) -> tuple[str, int] | None:
    """Serve ``/metrics`` from this (the main) process; the address served, or ``None``."""
    directory = prepare(settings)
    if directory is None or settings.metrics_port is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server

    # Every series exists (at 0) from the start, before any task has counted anything.
    import tasks.metrics  # noqa: F401

    registry = CollectorRegistry()
    registry.register(WorkerCollector(directory))
    registry.register(QueueCollector(settings.redis_url, settings.queue))
    server, _ = start_http_server(
        settings.metrics_port, addr=settings.metrics_address, registry=registry
    )
    _state["server"] = server
    host, port = server.server_address[:2]
    logger.info("metrics: serving http://%s:%s/metrics", host, port)
    return str(host), int(port)


def stop() -> None:
    """Stop serving and remove the directory (the pool has stopped by now)."""
    server = _state.pop("server", None)
    if server is not None:
        server.shutdown()
        server.server_close()
    directory = _state.pop("dir", None)
    if directory is not None:
        _remove(directory)


# Celery's signals ---------------------------------------------------------------------------


@import_modules.connect
def _before_task_modules(**_: Any) -> None:
    prepare(get_settings())


@worker_init.connect
def _serve(**_: Any) -> None:
    settings = get_settings()
    try:
        start(settings)
    except OSError as exc:
        # The worker still copies layers; the operator sees why its metrics are missing.
        logger.error(
            "metrics: cannot listen on %s:%s: %s",
            settings.metrics_address,
            settings.metrics_port,
            exc,
        )


@worker_process_init.connect
def _pool_child(**_: Any) -> None:
    """A forked pool process does not serve: it lets go of the parent's listening socket."""
    server = _state.pop("server", None)
    if server is not None:
        server.socket.close()


@worker_shutdown.connect
def _stopped(**_: Any) -> None:
    stop()
