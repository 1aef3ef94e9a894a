"""GoTime: Go's time.Time as the cache format writes it (RFC3339Nano, offsets kept)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.cacheformat import ZERO_TIME, GoTime


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("2025-12-15T21:36:46.926275561Z", "2025-12-15T21:36:46.926275561Z"),
        ("2025-12-15T21:36:46.900000000Z", "2025-12-15T21:36:46.9Z"),
        ("2025-12-15T21:36:46.000000000Z", "2025-12-15T21:36:46Z"),
        ("2025-12-15T21:36:46.0Z", "2025-12-15T21:36:46Z"),
        # More than nine digits: Go keeps nine (truncating, not rounding).
        ("2025-12-15T21:36:46.1234567899Z", "2025-12-15T21:36:46.123456789Z"),
        ("2020-03-08T03:39:46+06:00", "2020-03-08T03:39:46+06:00"),
        ("2024-05-07T00:40:20-08:00", "2024-05-07T00:40:20-08:00"),
        ("2024-05-07T00:40:20.5-08:30", "2024-05-07T00:40:20.5-08:30"),
        # A zero offset is always written Z.
        ("2024-05-07T00:40:20+00:00", "2024-05-07T00:40:20Z"),
        ("2024-05-07T00:40:20.120-00:00", "2024-05-07T00:40:20.12Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ("0000-02-29T23:59:59Z", "0000-02-29T23:59:59Z"),  # year 0 is a leap year
        ("9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59.999999999Z"),
    ],
)
def test_parse_then_format_like_go(text: str, written: str) -> None:
    assert str(GoTime.parse(text)) == written
    assert GoTime.parse(text).format() == written


@pytest.mark.parametrize(
    "text",
    [
        "2025-12-15t21:36:46Z",  # lower-case t
        "2025-12-15T21:36:46z",  # lower-case z
        "2025-12-15 21:36:46Z",
        "2025-12-15T1:36:46Z",  # one-digit hour
        "2025-12-15T21:36:46,5Z",  # comma fraction
        "2025-12-15T21:36:46.Z",  # dot without digits
        "2025-12-15T21:36:46",  # no zone
        "2025-12-15T24:00:00Z",
        "2025-12-15T23:60:00Z",
        "2025-12-15T23:59:60Z",  # Go refuses leap seconds here
        "2025-13-01T00:00:00Z",
        "2025-00-01T00:00:00Z",
        "2025-04-31T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2025-01-01T00:00:00+24:00",
        "2025-01-01T00:00:00+01:60",
        "2025-01-01T00:00:00+0100",
        "12025-01-01T00:00:00Z",
        "２０２５-01-01T00:00:00Z",  # non-ASCII digits
        "",
    ],
)
def test_go_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        GoTime.parse(text)


def test_nanoseconds_and_offset_are_kept() -> None:
    t = GoTime.parse("2024-02-26T07:59:14.66681574+05:30")
    assert t.nanosecond == 666_815_740
    assert t.offset_seconds == 5 * 3600 + 30 * 60
    expected = calendar.timegm((2024, 2, 26, 7, 59, 14)) - t.offset_seconds
    assert t.unix_seconds == expected
    assert str(t.utc()) == "2024-02-26T02:29:14.66681574Z"


def test_compared_by_instant_not_by_text() -> None:
    a = GoTime.parse("2020-03-08T03:39:46+06:00")
    b = GoTime.parse("2020-03-07T21:39:46Z")
    assert a == b
    assert hash(a) == hash(b)
    assert str(a) != str(b)
    later = GoTime.parse("2020-03-07T21:39:46.000000001Z")
    assert a < later and later > b and a <= b and a >= b
    assert not a < b


def test_zero_time() -> None:
    assert str(ZERO_TIME) == "0001-01-01T00:00:00Z"
    assert ZERO_TIME.is_zero
    assert GoTime() == ZERO_TIME
    assert GoTime.parse("0001-01-01T00:00:00Z").is_zero
    # The zero instant written with another offset is still Go's zero time.
    shifted = GoTime.parse("0001-01-01T01:00:00+01:00")
    assert shifted.is_zero
    assert str(shifted) == "0001-01-01T01:00:00+01:00"
    assert not GoTime.parse("0001-01-01T00:00:00.000000001Z").is_zero
    assert not GoTime.parse("2024-01-01T00:00:00Z").is_zero


def test_built_from_an_instant() -> None:
    assert str(GoTime(0)) == "1970-01-01T00:00:00Z"
    assert str(GoTime(0, 5)) == "1970-01-01T00:00:00.000000005Z"
    assert str(GoTime(0, 120_000_000, -3600)) == "1969-12-31T23:00:00.12-01:00"
    assert GoTime(0, 0, 3600) == GoTime(0)
    with pytest.raises(ValueError):
        GoTime(0, 1_000_000_000)
    with pytest.raises(ValueError):
        GoTime(0, 0, 30)  # offsets are whole minutes
    with pytest.raises(ValueError):
        GoTime(0, 0, 86_400)


def test_years_go_cannot_write() -> None:
    with pytest.raises(ValueError, match="year outside"):
        GoTime(GoTime.parse("0000-01-01T00:00:00Z").unix_seconds - 1).format()
    with pytest.raises(ValueError, match="year outside"):
        GoTime(GoTime.parse("9999-12-31T23:59:59Z").unix_seconds + 1).format()
    # Year 0 local time is fine, its UTC rendering is not.
    early = GoTime.parse("0000-01-01T00:30:00+01:00")
    assert str(early) == "0000-01-01T00:30:00+01:00"
    with pytest.raises(ValueError):
        early.utc().format()


_UTC = UTC


@settings(max_examples=200)
@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    nanos=st.integers(0, 999),
    offset_minutes=st.integers(-23 * 60 - 59, 23 * 60 + 59),
    digits=st.integers(0, 12),
)
def test_agrees_with_python_datetime(
    moment: datetime, nanos: int, offset_minutes: int, digits: int
) -> None:
    """Parse text written by Python and compare the instant with Python's reading of it."""
    zone = timezone(timedelta(minutes=offset_minutes))
    local = moment.replace(tzinfo=zone)
    nanosecond = moment.microsecond * 1000 + nanos
    fraction = f"{nanosecond:09d}".ljust(12, "0")[:digits]
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    suffix = "Z" if offset_minutes == 0 else f"{sign}{hours:02d}:{minutes:02d}"
    text = (
        local.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")
        + ("." + fraction if fraction else "")
        + suffix
    )
    parsed = GoTime.parse(text)
    epoch = datetime(1970, 1, 1, tzinfo=_UTC)
    whole = local.replace(microsecond=0) - epoch
    assert parsed.unix_seconds == whole.days * 86_400 + whole.seconds
    assert parsed.nanosecond == (int(fraction[:9].ljust(9, "0")) if fraction else 0)
    assert parsed.offset_seconds == offset_minutes * 60
    # Writing is canonical and reading the writing gives the same time back.
    again = GoTime.parse(str(parsed))
    assert str(again) == str(parsed)
    assert (again.unix_seconds, again.nanosecond) == (parsed.unix_seconds, parsed.nanosecond)
    rebuilt = GoTime(parsed.unix_seconds, parsed.nanosecond, parsed.offset_seconds)
    assert str(rebuilt) == str(parsed)
