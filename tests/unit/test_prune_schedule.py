"""The periodic prune's settings: off by default, validated before beat starts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.schedules import crontab

from tasks.settings import Settings
from worker.schedule import PRUNE_ENTRY, beat_schedule, parse_schedule


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_no_schedule_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CACHESHIP_PRUNE_SCHEDULE", "CACHESHIP_PRUNE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    assert beat_schedule(Settings()) == {}
    assert beat_schedule(settings(prune_schedule="  ", prune_cache="type=s3,bucket=abc")) == {}


def test_cron_and_durations() -> None:
    cron = parse_schedule("17 3 * * 1-5")
    assert isinstance(cron, crontab)
    assert cron.hour == {3} and cron.minute == {17} and cron.day_of_week == {1, 2, 3, 4, 5}
    assert parse_schedule("6h") == timedelta(hours=6)


@pytest.mark.parametrize("text", ["every day", "0s", "61 * * * *", "1d"])
def test_bad_schedules_name_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match="CACHESHIP_PRUNE_SCHEDULE"):
        parse_schedule(text)


def test_the_entry_carries_a_validated_prune_request() -> None:
    schedule = beat_schedule(
        settings(
            prune_schedule="30m",
            prune_cache="type=s3,bucket=ci-cache,prefix=team/",
            prune_grace="48h",
            prune_expire_names="720h",
            prune_keep_names="main, release/*",
            queue="builds",
        )
    )
    entry = schedule[PRUNE_ENTRY]
    assert entry["task"] == "cacheship.prune"
    assert entry["schedule"] == timedelta(minutes=30)
    assert entry["options"]["queue"] == "builds"
    (request,) = entry["args"]
    assert request["cache"]["bucket"] == "ci-cache" and request["cache"]["prefix"] == "team/"
    assert request["grace"] == 48 * 3600 and request["expire_names"] == 720 * 3600
    assert request["keep_names"] == ["main", "release/*"]
    assert request["dry_run"] is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "CACHESHIP_PRUNE_CACHE: required"),
        ({"prune_cache": "type=s3"}, "cache.bucket: required"),
        ({"prune_cache": "type=local,src=/x"}, "only type=s3"),
        ({"prune_cache": "type=s3,bucket=abc", "prune_grace": "1 day"}, "grace: '1 day'"),
    ],
)
def test_bad_prune_settings_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        beat_schedule(settings(prune_schedule="1h", **values))
