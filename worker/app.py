"""The Celery application, configured for long, resumable, kill-safe copies.

Late acks with requeue on worker loss (a killed pool process's layer runs again), prefetch 1
(a worker never hoards layers others could copy), JSON only (pickle refused), events on
(Flower shows every step). The Redis visibility timeout is a short lease that each worker
renews for the messages it holds (``worker/leases.py``): a healthy copy of any length is
never delivered twice, and a vanished worker's messages are back in the queue within about
a minute.

The default pool is threads: layer copies wait on S3 and on Redis, not on the CPU (hashing
and socket I/O release the GIL), and a task in a thread skips the pipe to a pool process and
back. Measured (bench/RESULTS.md): about half the time per small layer of prefork with the
same concurrency, and one interpreter instead of five (about 110 MiB idle, not 440).
``CACHESHIP_POOL=prefork`` chooses prefork, which adds Celery's hard time limit and the
requeue at once of a single killed pool process's layer (threads have no analogue of
either; a stuck S3 request still ends by botocore's timeouts).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init

from tasks.settings import Settings, get_settings
from worker import metrics as _metrics  # noqa: F401  (its signal handlers serve /metrics)
from worker.schedule import beat_schedule

#: Seconds a command on a silent connection (a black-holed network, a frozen server) waits for
#: its answer before it counts as failed and is retried: well under the lease.
SOCKET_TIMEOUT = 15


def publish_retry(patience: float) -> dict[str, Any]:
    """Celery's publish retry policy spanning ``patience`` seconds (a Redis restart)."""
    return {
        "max_retries": max(1, int(patience / 2) + 4),
        "interval_start": 0.1,
        "interval_step": 0.5,
        "interval_max": 2,
    }


def configure(app: Celery, settings: Settings) -> None:
    """Apply the settings; also used by tests that build an app for a throw-away Redis."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        # Look for the lapsed leases of dead workers on every sweep (each 10 s), not on every
        # 10th as recent kombu does by default: a killed worker's copy then runs again about
        # visibility_timeout after its last renewal, not up to 100 s later.
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        broker_url=settings.redis_url,
        result_backend=settings.redis_url,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_deduplicate_successful_tasks=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend_always_retry=True,
        # Each attempt is itself retried for CACHESHIP_REDIS_PATIENCE (make_patient).
        result_backend_max_retries=20,
        redis_socket_timeout=SOCKET_TIMEOUT,
        redis_socket_connect_timeout=SOCKET_TIMEOUT,
        redis_backend_health_check_interval=10,
        redis_retry_on_timeout=True,
        redis_socket_keepalive=True,
        task_default_queue=settings.queue,
        # Set here, not by --pool: celery worker cannot tell --pool prefork from its default.
        worker_pool=settings.pool,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_extended=True,
        result_expires=settings.result_expires,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_soft_time_limit,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        broker_connection_timeout=10,
        # A Redis restart or fail-over: a message sent meanwhile (a retry, the chord's
        # callback) waits for it instead of being lost after Celery's 0.6 s.
        task_publish_retry_policy=publish_retry(settings.redis_patience),
        timezone="UTC",
        beat_schedule=beat_schedule(settings),
    )


app = Celery(
    "cacheship",
    include=[
        "tasks.jobs.export",
        "tasks.jobs.copy_layer",
        "tasks.jobs.finalize",
        "tasks.jobs.prune",
        "worker.health",
        "worker.leases",
        "worker.refusals",
    ],
)


@app.on_configure.connect
def _from_environment(sender: Celery, **_: Any) -> None:
    """Read the settings when the configuration is first needed, not at import.

    Importing ``worker`` (the command line does) then never fails on a bad setting; the
    error surfaces where it can be reported as one line.
    """
    configure(sender, get_settings())


@worker_init.connect
@worker_process_init.connect
def _patient_redis(**_: Any) -> None:
    """Let each process that runs tasks ride out a Redis outage instead of failing its task.

    That is the worker's own process with the threads pool (``worker_init``), each pool
    process with prefork (``worker_process_init``).

    Celery retries its own result writes, but the bookkeeping (plan, outcomes) and the
    chord's counting use the backend's Redis client directly, whose connections retry a
    command once, at once. Give them a backoff that spans ``CACHESHIP_REDIS_PATIENCE``.
    """
    make_patient(app)


def make_patient(celery_app: Celery, patience: float | None = None) -> None:
    """Give the result backend's Redis client a backoff that spans a Redis outage."""
    from worker.internals import backend_redis, set_patience

    client: Any = backend_redis(celery_app.backend)
    if client is not None:
        set_patience(client, get_settings().redis_patience if patience is None else patience)
