"""Requests against the lists: which attribute is refused, and the setting that refuses it."""

from __future__ import annotations

import pytest

from tasks.policy import check_request, check_spec, endpoint_for, make_policy, policy_from_env
from tasks.request import RequestError, S3Spec, parse_request, parse_spec
from tasks.settings import Settings

WORKER = make_policy("http://minio:9000", ["https://backup.example.com"], ["team"], ["golden"])


def s3(bucket: str, endpoint: str | None = None) -> dict[str, object]:
    spec: dict[str, object] = {"type": "s3", "bucket": bucket}
    if endpoint is not None:
        spec["endpoint_url"] = endpoint
    return spec


def test_the_configured_endpoint_and_the_listed_ones_are_allowed_in_canonical_form() -> None:
    assert endpoint_for(S3Spec(bucket="team"), WORKER, "target") is None  # the default
    spec = S3Spec(bucket="team", endpoint_url="HTTP://MINIO:9000/")
    assert endpoint_for(spec, WORKER, "target") == "http://minio:9000"
    spec = S3Spec(bucket="team", endpoint_url="https://backup.example.com")
    assert endpoint_for(spec, WORKER, "source") == "https://backup.example.com:443"


@pytest.mark.parametrize(
    ("role", "endpoint", "message"),
    [
        ("target", "http://evil:9000", r"target\.endpoint_url: http://evil:9000 is not an allowed"),
        ("source", "http://minio.evil:9000", r"CACHESHIP_ALLOWED_ENDPOINTS"),
    ],
)
def test_other_endpoints_are_refused_naming_attribute_and_settings(
    role: str, endpoint: str, message: str
) -> None:
    with pytest.raises(RequestError, match=message) as refused:
        endpoint_for(S3Spec(bucket="team", endpoint_url=endpoint), WORKER, role)
    text = str(refused.value)
    if "not an allowed" in text:
        assert "CACHESHIP_S3_ENDPOINT_URL" in text and "CACHESHIP_ALLOWED_ENDPOINTS" in text
    assert "evil:9000@" not in text  # user info is never echoed


def test_user_info_is_refused_when_the_request_is_read_and_never_echoed() -> None:
    for text in ("type=s3,bucket=team,endpoint_url=http://minio:9000@evil",
                 "type=s3,bucket=team,endpoint_url=http://u:hunter22@evil"):
        with pytest.raises(RequestError, match=r"source\.endpoint_url: must not contain user info"
                           ) as refused:
            parse_spec(text, "source")
        assert "hunter22" not in str(refused.value) and "evil" not in str(refused.value)


def test_buckets_by_role() -> None:
    check_request(parse_request({"source": s3("golden"), "target": s3("team")}), WORKER)
    check_request(parse_request({"source": s3("team"), "target": s3("team", None)}), WORKER)
    with pytest.raises(RequestError, match=r"target\.bucket: 'golden' is read-only: it is "
                                           r"listed in CACHESHIP_READABLE_BUCKETS"):
        check_request(parse_request({"source": s3("team"), "target": s3("golden")}), WORKER)
    with pytest.raises(RequestError, match=r"source\.bucket: 'other' is in neither "
                                           r"CACHESHIP_ALLOWED_BUCKETS nor CACHESHIP_READABLE"):
        check_request(parse_request({"source": s3("other"), "target": s3("team")}), WORKER)
    with pytest.raises(RequestError, match=r"cache\.bucket: 'other' is not in "
                                           r"CACHESHIP_ALLOWED_BUCKETS"):
        check_spec(S3Spec(bucket="other"), WORKER, "cache", "write")


def test_a_worker_without_lists_allows_any_bucket_but_no_named_endpoint() -> None:
    open_policy = make_policy(None, [], [], [])
    check_request(parse_request({"source": s3("a-b"), "target": s3("c-d")}), open_policy)
    with pytest.raises(RequestError, match=r"target\.endpoint_url"):
        check_request(
            parse_request({"source": s3("a-b"), "target": s3("c-d", "http://x:1")}), open_policy
        )


def test_a_submitter_checks_only_what_its_environment_tells() -> None:
    request = parse_request({"source": s3("other", "http://evil:1"), "target": s3("x-y")})
    check_request(request, policy_from_env({}))  # nothing set here: the workers decide
    with pytest.raises(RequestError, match=r"source\.endpoint_url"):
        check_request(request, policy_from_env({"CACHESHIP_S3_ENDPOINT_URL": "http://m:9000"}))
    with pytest.raises(RequestError, match=r"target\.bucket"):
        check_request(request, policy_from_env({"CACHESHIP_ALLOWED_BUCKETS": "other"}))
    env = {
        "CACHESHIP_ALLOWED_ENDPOINTS": "http://evil:1,http://m:2",
        "CACHESHIP_READABLE_BUCKETS": "other",
    }
    check_request(request, policy_from_env(env))


def test_settings_refuse_a_bad_endpoint_list_and_a_bucket_in_both_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHESHIP_ALLOWED_ENDPOINTS", "http://ok:1, http://a@b")
    with pytest.raises(ValueError, match="allowed_endpoints"):
        Settings()
    monkeypatch.setenv("CACHESHIP_ALLOWED_ENDPOINTS", "http://ok:1,https://s3.example.com")
    monkeypatch.setenv("CACHESHIP_ALLOWED_BUCKETS", "team,golden")
    monkeypatch.setenv("CACHESHIP_READABLE_BUCKETS", "golden")
    with pytest.raises(ValueError, match="golden also in allowed_buckets"):
        Settings()
    monkeypatch.setenv("CACHESHIP_ALLOWED_BUCKETS", "team")
    settings = Settings()
    assert settings.allowed_endpoints == ["http://ok:1", "https://s3.example.com"]
    assert settings.readable_buckets == ["golden"]
    spec = S3Spec(bucket="golden", endpoint_url="http://OK:1")
    assert check_spec(spec, settings.policy(), "source", "read") == "http://ok:1"


@pytest.mark.parametrize("region", ["evil.example.com", "us-east-1/..", "a b", "eu-west-1#"])
def test_a_region_cannot_carry_a_host_name(region: str) -> None:
    """Without an endpoint the region is part of the host botocore connects to."""
    with pytest.raises(RequestError, match=r"target\.region: must be a region name"):
        parse_request(
            {"source": s3("team"), "target": {"type": "s3", "bucket": "team", "region": region}}
        )
    assert S3Spec(bucket="team", region="eu-west-1").region == "eu-west-1"
