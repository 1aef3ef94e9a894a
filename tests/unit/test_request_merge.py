"""The target's merge attributes: merge, max_records, max_age (cacheship's own)."""

from __future__ import annotations

import jsonschema
import pytest

from tasks.request import RequestError, parse_request, parse_target, request_schema

BASE = "type=s3,bucket=ci-cache"


def test_overwrite_is_the_default() -> None:
    target = parse_target(BASE)
    assert (target.merge, target.merges, target.max_records, target.max_age) == (
        "false",
        False,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("text", "merge", "max_records", "max_age"),
    [
        ("merge=true", "true", None, None),
        ("merge=TRUE,max_records=5", "true", 5, None),
        ("merge=1,max-records=7", "true", 7, None),
        ("merge=true,max_age=14d", "true", None, 14 * 86400.0),
        ("merge=true,max_age=1d12h", "true", None, 36 * 3600.0),
        ("merge=true,max_age=90m", "true", None, 5400.0),
        ("merge=replace-invalid,max_age=3600", "replace-invalid", None, 3600.0),
        ("merge=false", "false", None, None),
    ],
)
def test_merge_attributes(
    text: str, merge: str, max_records: int | None, max_age: float | None
) -> None:
    target = parse_target(f"{BASE},{text}")
    assert (target.merge, target.max_records, target.max_age) == (merge, max_records, max_age)
    assert target.merges is (merge != "false")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge=maybe", "target.merge: Input should be 'false', 'true' or 'replace-invalid'"),
        (
            "merge=true,max_records=-1",
            "target.max_records: Input should be greater than or equal to 1",
        ),
        ("merge=true,max_records=many", "target.max_records: Input should be a valid integer"),
        ("merge=true,max_age=xd", "target.max_age: 'xd' is not an age like 14d, 36h or 1d12h"),
        ("merge=true,max_age=2w", "target.max_age: '2w' is not a duration"),
        ("merge=true,max_age=0s", "target.max_age: Input should be greater than 0"),
        ("max_records=10", "target: max_records only applies with merge=true"),
        ("merge=false,max_age=1h", "target: max_age only applies with merge=true"),
    ],
)
def test_bad_merge_attributes_name_the_field(text: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_target(f"{BASE},{text}")
    assert str(caught.value).startswith(message)


def test_json_requests_take_booleans() -> None:
    request = parse_request(
        {
            "source": {"type": "local", "src": "/srv/caches/app"},
            "target": {"type": "s3", "bucket": "ci-cache", "merge": True, "max_records": 100},
        }
    )
    assert request.target.merges and request.target.max_records == 100
    with pytest.raises(RequestError, match=r"^target\.max_records: Input should be greater"):
        parse_request(
            {
                "source": {"type": "local", "src": "/srv/caches/app"},
                "target": {"type": "s3", "bucket": "ci-cache", "merge": True, "max_records": 0},
            }
        )


def test_a_source_cannot_merge() -> None:
    with pytest.raises(RequestError, match=r"^request: source\.merge: only a target"):
        parse_request(
            {
                "source": {"type": "s3", "bucket": "ci-cache", "merge": True},
                "target": {"type": "s3", "bucket": "ci-cache", "name": "copy"},
            }
        )


def test_the_schema_takes_what_the_parser_takes() -> None:
    schema = request_schema()
    for merge, valid in ((True, True), ("replace-invalid", True), ("maybe", False)):
        document = {
            "source": {"type": "local", "src": "/srv/caches/app"},
            "target": {"type": "s3", "bucket": "ci-cache", "merge": merge, "max_age": "14d"},
        }
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(document))
        assert (not errors) is valid, (merge, errors)
