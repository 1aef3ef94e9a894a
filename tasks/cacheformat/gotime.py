"""Go's ``time.Time`` as the cache format needs it: nanoseconds and the original UTC offset.

A cache config's digest depends on how its ``createdAt`` values are written, and BuildKit
writes them with Go's ``time.RFC3339Nano`` layout: nine fractional digits at most, trailing
zeros dropped, ``Z`` for a zero offset and ``+hh:mm``/``-hh:mm`` otherwise. A Python
``datetime`` keeps only microseconds and cannot hold year 0, so it would silently change
digests; :class:`GoTime` keeps exactly what Go keeps.

Comparison and hashing use the instant only (Go's ``Time.Equal``/``Compare``): BuildKit
de-duplicates results and picks the newest one by instant, whatever offset they were
written with.
"""

from __future__ import annotations

import re
from typing import Final

_NANOS_PER_SECOND: Final = 1_000_000_000
_SECONDS_PER_DAY: Final = 86_400
_MAX_OFFSET: Final = 24 * 3600

# Go's strict RFC 3339 parser (time.Time.UnmarshalJSON): four-digit year, two-digit fields
# in range, upper-case T and Z, any number of fractional digits (nine are kept), offset
# ±hh:mm under 24h. Only "day exists in that month" is left to check.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.([0-9]+))?(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
_SHAPE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_DAYS_IN_MONTH: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _days_in(month: int, year: int) -> int:
    if month == 2 and _is_leap(year):
        return 29
    return _DAYS_IN_MONTH[month]


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (any year, even 0)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    days += 719_468
    era = days // 146_097
    doe = days - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


_ZERO_UNIX: Final = _days_from_civil(1, 1, 1) * _SECONDS_PER_DAY


class GoTime:
    """An instant with nanosecond precision plus the UTC offset it was written with.

    Build one with :meth:`parse` (from RFC 3339 text) or from Unix seconds, nanoseconds and
    an offset in seconds. ``str(t)`` is Go's RFC3339Nano rendering; the zero value
    (``GoTime()``) is Go's zero time ``0001-01-01T00:00:00Z``.
    """

    __slots__ = ("_nsec", "_offset", "_sec", "_text")

    # A parsed time keeps its text and computes the instant only when compared: a large
    # config holds hundreds of thousands of times and compares few of them.
    _sec: int | None
    _nsec: int
    _offset: int
    _text: str | None

    def __init__(
        self, unix_seconds: int = _ZERO_UNIX, nanosecond: int = 0, offset_seconds: int = 0
    ) -> None:
        if type(unix_seconds) is not int or type(nanosecond) is not int:
            raise TypeError("GoTime takes integer seconds and nanoseconds")
        if not 0 <= nanosecond < _NANOS_PER_SECOND:
            raise ValueError(f"nanosecond out of range: {nanosecond}")
        if offset_seconds % 60 or not -_MAX_OFFSET < offset_seconds < _MAX_OFFSET:
            raise ValueError(f"UTC offset must be whole minutes under 24h: {offset_seconds}")
        self._sec = unix_seconds
        self._nsec = nanosecond
        self._offset = offset_seconds
        self._text = None

    @classmethod
    def parse(cls, text: str) -> GoTime:
        """Parse RFC 3339 text the way Go's ``time.Time.UnmarshalJSON`` does.

        Raises ValueError with the reason when Go would refuse the text.
        """
        match = _RFC3339.fullmatch(text)
        if match is None:
            raise ValueError(_refusal(text))
        month_s, day_s, frac, zone = match.groups()
        if day_s > "28" and int(day_s) > _days_in(int(month_s), int(text[:4])):
            raise ValueError(f"day out of range in {text!r}")
        canonical = text
        if frac is not None and (len(frac) > 9 or frac[-1] == "0"):
            digits = frac[:9].rstrip("0")
            canonical = text[:19] + ("." + digits if digits else "") + zone
        if zone[0] != "Z" and zone[1:] == "00:00":
            canonical = canonical[: -len(zone)] + "Z"
        self = cls.__new__(cls)
        self._sec = None
        self._text = canonical
        return self

    def _resolve(self) -> int:
        """Compute the instant of a parsed time (Go writes the wall clock back unchanged)."""
        sec = self._sec
        if sec is not None:
            return sec
        text = self._text
        assert text is not None
        local = _days_from_civil(int(text[:4]), int(text[5:7]), int(text[8:10])) * (
            _SECONDS_PER_DAY
        ) + (int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19]))
        if text[19] == ".":
            end = 20
            while text[end].isdigit():
                end += 1
            self._nsec = int(text[20:end].ljust(9, "0"))
            zone = text[end:]
        else:
            self._nsec = 0
            zone = text[19:]
        offset = 0
        if zone != "Z":
            offset = (int(zone[1:3]) * 60 + int(zone[4:6])) * 60
            if zone[0] == "-":
                offset = -offset
        self._offset = offset
        sec = self._sec = local - offset
        return sec

    @property
    def unix_seconds(self) -> int:
        """Whole seconds since 1970-01-01T00:00:00Z (negative before)."""
        return self._resolve()

    @property
    def nanosecond(self) -> int:
        """Nanoseconds within the second, 0 to 999,999,999."""
        self._resolve()
        return self._nsec

    @property
    def offset_seconds(self) -> int:
        """The UTC offset the time is written with (0 is written ``Z``)."""
        self._resolve()
        return self._offset

    @property
    def is_zero(self) -> bool:
        """Go's ``IsZero``: the instant 0001-01-01T00:00:00Z, whatever the offset."""
        text = self._text
        if self._sec is None and text is not None and not text.startswith(("0001-", "0000-")):
            return False  # the zero instant is written in year 0 or 1 whatever the offset
        return self._resolve() == _ZERO_UNIX and self._nsec == 0

    def utc(self) -> GoTime:
        """The same instant written with offset zero (Go's ``t.UTC()``)."""
        sec = self._resolve()
        if self._offset == 0:
            return self
        return GoTime(sec, self._nsec, 0)

    def format(self) -> str:
        """Go's ``time.RFC3339Nano`` rendering; ValueError outside years 0 to 9999.

        Go's ``MarshalJSON`` refuses those years too, so such a time can never reach a
        config.
        """
        text = self._text
        if text is None:
            text = self._text = self._render()
        return text

    def _render(self) -> str:
        assert self._sec is not None
        local = self._sec + self._offset
        days, seconds = divmod(local, _SECONDS_PER_DAY)
        year, month, day = _civil_from_days(days)
        if not 0 <= year <= 9999:
            raise ValueError(f"year outside of range [0,9999]: {year}")
        hour, rest = divmod(seconds, 3600)
        minute, second = divmod(rest, 60)
        text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
        if self._nsec:
            text += "." + f"{self._nsec:09d}".rstrip("0")
        if self._offset == 0:
            return text + "Z"
        sign = "-" if self._offset < 0 else "+"
        zone_hours, zone_minutes = divmod(abs(self._offset) // 60, 60)
        return f"{text}{sign}{zone_hours:02d}:{zone_minutes:02d}"

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        try:
            return f"GoTime({self.format()!r})"
        except ValueError:
            return f"GoTime({self._sec}, {self._nsec}, {self._offset})"

    def _key(self) -> tuple[int, int]:
        return (self._resolve(), self._nsec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GoTime):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: GoTime) -> bool:
        return self._key() < other._key()

    def __le__(self, other: GoTime) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: GoTime) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: GoTime) -> bool:
        return self._key() >= other._key()


def _refusal(text: str) -> str:
    """Why Go would refuse ``text`` (the shape is wrong, or a field is out of range)."""
    if _SHAPE.fullmatch(text) is None:
        return f"not an RFC 3339 time: {text!r}"
    return f"RFC 3339 time with a field out of range: {text!r}"


#: Go's zero time, written ``0001-01-01T00:00:00Z``.
ZERO_TIME: Final = GoTime()
