"""A source blob's read survives connections cut mid-body (ranged GETs from the last byte)."""

from __future__ import annotations

import io

import pytest
from botocore.exceptions import IncompleteReadError

from tasks.backends.s3.source import ResumingBody

DATA = bytes(range(256)) * 40


class CutBody:
    """A body that delivers ``cut`` bytes and then breaks, as a reset connection does."""

    def __init__(self, data: bytes, cut: int | None) -> None:
        self._stream, self._left = io.BytesIO(data), cut

    def read(self, size: int | None = None) -> bytes:
        if self._left is not None and self._left <= 0:
            raise IncompleteReadError(actual_bytes=0, expected_bytes=1)
        want = size if size is not None else -1
        if self._left is not None:
            want = self._left if want < 0 else min(want, self._left)
        data = self._stream.read(want)
        if self._left is not None:
            self._left -= len(data)
        return data

    def close(self) -> None:
        pass


def test_a_body_cut_three_times_is_read_whole_from_where_it_broke() -> None:
    offsets: list[int] = []

    def fetch(offset: int) -> CutBody:
        offsets.append(offset)
        cut = 1000 if len(offsets) <= 3 else None
        return CutBody(DATA[offset:], cut)

    body = ResumingBody(fetch)
    got = bytearray()
    while chunk := body.read(700):
        got += chunk
    assert bytes(got) == DATA
    assert offsets == [0, 1000, 2000, 3000]


def test_readinto_fills_a_buffer_across_a_cut() -> None:
    calls: list[int] = []

    def fetch(offset: int) -> CutBody:
        calls.append(offset)
        return CutBody(DATA[offset:], 500 if not offset else None)

    body = ResumingBody(fetch)
    buffer = bytearray(len(DATA))
    done = 0
    with memoryview(buffer) as view:
        while n := body.readinto(view[done:]):
            done += n
    assert bytes(buffer) == DATA and calls == [0, 500]


def test_it_gives_up_after_its_resumes_and_passes_other_errors_on() -> None:
    body = ResumingBody(lambda offset: CutBody(DATA[offset:], 10), resumes=2)
    with pytest.raises(IncompleteReadError):
        while body.read(100):
            pass

    class Broken(CutBody):
        def read(self, size: int | None = None) -> bytes:
            raise ValueError("not a connection problem")

    fetched: list[int] = []

    def fetch(offset: int) -> Broken:
        fetched.append(offset)
        return Broken(DATA, None)

    with pytest.raises(ValueError):
        ResumingBody(fetch).read(10)
    assert fetched == [0]
