"""The periodic prune, as a Celery beat entry built from ``CACHESHIP_PRUNE_*`` settings.

Off unless ``CACHESHIP_PRUNE_SCHEDULE`` is set. Beat only enqueues ``cacheship.prune`` like
``cacheship prune`` does; a worker runs it. Run exactly one beat process: two would enqueue
every prune twice (the second is refused by the scope's prune lock, but still costs a task).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab

from tasks.backends.s3.prune import parse_prune_request
from tasks.request import RequestError, S3Spec, parse_go_duration, parse_spec
from tasks.settings import Settings

PRUNE_ENTRY = "cacheship-prune"


def parse_schedule(text: str) -> crontab | timedelta:
    """A five-field cron expression (UTC) or a Go duration; errors name the setting."""
    fields = text.split()
    try:
        if len(fields) == 5:
            minute, hour, day_of_month, month_of_year, day_of_week = fields
            return crontab(
                minute=minute,
                hour=hour,
                day_of_month=day_of_month,
                month_of_year=month_of_year,
                day_of_week=day_of_week,
            )
        seconds = parse_go_duration(text)
    except ValueError as exc:
        raise ValueError(f"CACHESHIP_PRUNE_SCHEDULE: {exc}") from None
    if seconds < 1:
        raise ValueError(
            f"CACHESHIP_PRUNE_SCHEDULE: {text!r} is neither a cron expression "
            "('17 3 * * *') nor a duration of at least 1s"
        )
    return timedelta(seconds=seconds)


def prune_request(settings: Settings) -> dict[str, Any]:
    """The scheduled prune's message, validated now so a bad setting stops beat at start."""
    if not settings.prune_cache:
        raise ValueError("CACHESHIP_PRUNE_CACHE: required when CACHESHIP_PRUNE_SCHEDULE is set")
    try:
        spec = parse_spec(settings.prune_cache, "cache")
        if not isinstance(spec, S3Spec):
            raise RequestError("cache.type: only type=s3 caches can be pruned")
        request = parse_prune_request(
            {
                "cache": spec.model_dump(mode="json", by_alias=True),
                "grace": settings.prune_grace,
                "expire_names": settings.prune_expire_names,
                "keep_names": settings.prune_keep_names,
            }
        )
    except RequestError as exc:
        raise ValueError(f"CACHESHIP_PRUNE_*: {exc}") from None
    return request.model_dump(mode="json", by_alias=True)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule``: the prune entry, or nothing when no schedule is set."""
    if not settings.prune_schedule:
        return {}
    request = prune_request(settings)
    cache = request["cache"]
    return {
        PRUNE_ENTRY: {
            "task": "cacheship.prune",
            "schedule": parse_schedule(settings.prune_schedule),
            "args": [request],
            "options": {
                "queue": settings.queue,
                "shadow": f"prune s3://{cache['bucket']}/{cache['prefix']} (scheduled)",
                # A prune that waited longer than its period is superseded by the next one.
                "expires": 3600,
            },
        }
    }
