"""The Celery application, configured for long, resumable, kill-safe copies.

Choices follow Celery's advice for long tasks: late acks with requeue on worker loss (a
killed worker's layer runs again elsewhere), prefetch 1 (a worker never hoards layers others
could copy), a Redis visibility timeout above the longest task (no double delivery of a
healthy long copy), JSON only (pickle refused), events on (Flower shows every step).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.settings import Settings, get_settings


def configure(app: Celery, settings: Settings) -> None:
    """Apply the settings; also used by tests that build an app for a throw-away Redis."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Look for the unacked messages of dead workers on every sweep (each 10 s), not on
        # every 10th as recent kombu does by default: a killed worker's copy then runs again
        # about visibility_timeout after it started, not up to 100 s later.
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
        result_backend_max_retries=20,
        redis_backend_health_check_interval=10,
        redis_retry_on_timeout=True,
        redis_socket_keepalive=True,
        task_default_queue=settings.queue,
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
        timezone="UTC",
    )


app = Celery("cacheship", include=["tasks.pipeline", "worker.health"])


@app.on_configure.connect
def _from_environment(sender: Celery, **_: Any) -> None:
    """Read the settings when the configuration is first needed, not at import.

    Importing ``worker`` (the command line does) then never fails on a bad setting; the
    error surfaces where it can be reported as one line.
    """
    configure(sender, get_settings())
