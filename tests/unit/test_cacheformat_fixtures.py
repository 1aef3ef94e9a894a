"""The golden cases produced by BuildKit's own parser and normaliser.

Each ``case-NNN.json`` holds an ``input`` config (S3 layout) and either the ``canonical``
bytes BuildKit's parse-then-marshal wrote with their ``digest``, or the ``error`` BuildKit
refused it with.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tasks.cacheformat import FormatError, normalize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cacheconfig"
CASES = sorted(FIXTURES.glob("case-*.json"))

# The kinds of refusal of section 3 of the format document.
KINDS = (
    "invalid record ID",
    "invalid looping record",
    "invalid empty input for record",
    "invalid layer index",
    "invalid looping layer",
    "cache layer with missing annotations",
    "cache layer with missing diffid",
)


def kind_of(message: str) -> str:
    found = [kind for kind in KINDS if kind in message]
    assert found, f"not one of the known kinds of error: {message!r}"
    return found[0]


def test_fixture_directory_is_present() -> None:
    assert FIXTURES.is_dir(), f"golden fixtures missing: {FIXTURES}"
    assert len(CASES) >= 10


def _id(path: Path | None) -> str:
    return path.stem if path else "missing"


@pytest.mark.parametrize("path", CASES or [None], ids=_id)
def test_fixture_case(path: Path | None) -> None:
    assert path is not None, f"no golden fixtures under {FIXTURES}"
    case = json.loads(path.read_text(encoding="utf-8"))
    # The same input whichever way its JSON is spelled (escaped or raw non-ASCII).
    spellings = [
        json.dumps(case["input"], ensure_ascii=False).encode("utf-8"),
        json.dumps(case["input"], ensure_ascii=True, indent=1).encode("ascii"),
    ]
    if "error" in case:
        expected_kind = kind_of(case["error"])
        for data in spellings:
            with pytest.raises(FormatError) as caught:
                normalize(data)
            message = str(caught.value)
            assert kind_of(message) == expected_kind, message
            assert case["error"] in message
            assert "\n" not in message
            assert re.match(r"(records|layers)\[\d+\]", message), message
    else:
        for data in spellings:
            canonical = normalize(data)
            assert canonical.decode("utf-8") == case["canonical"]
            assert "sha256:" + hashlib.sha256(canonical).hexdigest() == case["digest"]
