"""Pure parts of the registry client: bodies in pieces, skipping what the registry holds,
Retry-After, too-large refusals."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from tasks.backends.registry.client import error_code, retry_after
from tasks.backends.registry.errors import CacheTooLargeError, check_import_limits, too_large
from tasks.backends.registry.upload import pieces, skip
from tasks.backends.target import DigestMismatchError
from tasks.cacheformat import Descriptor

MiB = 1024 * 1024


class Unseekable(io.BytesIO):
    def seekable(self) -> bool:
        return False


def test_pieces_stream_exactly_the_length_and_report_progress() -> None:
    data = bytes(range(256)) * 10_000
    marks: list[int] = []
    got = b"".join(pieces(io.BytesIO(data), len(data) - 5, marks.append, 100))
    assert got == data[: len(data) - 5]
    assert marks[-1] == 100 + len(data) - 5 and marks == sorted(marks)
    with pytest.raises(DigestMismatchError, match="source ended after 10 bytes"):
        list(pieces(io.BytesIO(b"x" * 10), 11, marks.append, 0))


@pytest.mark.parametrize("stream_type", [io.BytesIO, Unseekable])
def test_skip_moves_past_what_the_registry_holds(stream_type: type[io.BytesIO]) -> None:
    data = bytes(range(256)) * 20_000
    stream = stream_type(data)
    skip(stream, 3 * MiB + 7)
    assert stream.read(10) == data[3 * MiB + 7 : 3 * MiB + 17]
    with pytest.raises(DigestMismatchError):
        skip(Unseekable(b"short"), 10)


def test_retry_after_in_seconds_or_as_a_date() -> None:
    def answer(value: str | None) -> httpx.Response:
        headers = {"Retry-After": value} if value is not None else {}
        return httpx.Response(429, headers=headers)

    assert retry_after(answer("7"), 1.0) == 7.0
    assert retry_after(answer(None), 1.5) == 1.5
    assert retry_after(answer("soon"), 2.0) == 2.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after(answer(later), 0.0) <= 31


def test_error_codes_are_read_from_distribution_bodies() -> None:
    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
    assert error_code(httpx.Response(404, content=body)) == (
        "BLOB_UNKNOWN", "blob unknown to registry"
    )
    assert error_code(httpx.Response(500, content=b"<html>")) == ("", "")


def test_buildkits_one_mebibyte_limit_names_the_remedies() -> None:
    small = Descriptor("application/vnd.buildkit.cacheconfig.v0", "sha256:" + "a" * 64, MiB)
    big = Descriptor("application/vnd.buildkit.cacheconfig.v0", "sha256:" + "b" * 64, MiB + 1)
    assert too_large("config", small) is None
    check_import_limits(small, small)
    with pytest.raises(CacheTooLargeError) as refused:
        check_import_limits(big, small)
    message = str(refused.value)
    assert "1048577 bytes, over the 1048576 bytes (1 MiB)" in message
    assert "mode=min" in message and "max_records" in message
