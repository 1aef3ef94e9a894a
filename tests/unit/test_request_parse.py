"""buildx's ``type=...,key=value`` form: every BuildKit attribute, and every way to get it wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.request import (
    LocalSpec,
    RequestError,
    S3Spec,
    parse_go_duration,
    parse_request,
    parse_spec,
    parse_target,
    request_schema,
)


def s3(text: str) -> S3Spec:
    spec = parse_spec(text, "target")
    assert isinstance(spec, S3Spec)
    return spec


def test_defaults_are_buildkits() -> None:
    spec = s3("type=s3,bucket=cache-bucket")
    assert spec.bucket == "cache-bucket"
    assert spec.region is None
    assert spec.prefix == ""
    assert spec.blobs_prefix == "blobs/"
    assert spec.manifests_prefix == "manifests/"
    assert spec.name == ["buildkit"]
    assert spec.endpoint_url is None
    assert spec.use_path_style is None
    assert spec.touch_refresh == 24 * 3600
    assert spec.upload_parallelism == 4
    assert spec.oci_mediatypes is False
    assert spec.image_manifest is False
    assert spec.mode is None
    assert spec.blob_key("sha256:ab") == "blobs/sha256:ab"
    assert spec.manifest_key("buildkit") == "manifests/buildkit"


@pytest.mark.parametrize(
    ("attribute", "field", "expected"),
    [
        ("region=eu-west-1", "region", "eu-west-1"),
        ("prefix=team-a/", "prefix", "team-a/"),
        ("blobs_prefix=b/", "blobs_prefix", "b/"),
        ("manifests_prefix=m/", "manifests_prefix", "m/"),
        ("name=main", "name", ["main"]),
        ("name=main;pr-12;sha-abc", "name", ["main", "pr-12", "sha-abc"]),
        ("endpoint_url=http://minio:9000", "endpoint_url", "http://minio:9000"),
        ("endpoint_url=https://s3.example.com", "endpoint_url", "https://s3.example.com"),
        ("use_path_style=true", "use_path_style", True),
        ("use_path_style=false", "use_path_style", False),
        ("touch_refresh=24h", "touch_refresh", 86400.0),
        ("touch_refresh=1h30m", "touch_refresh", 5400.0),
        ("touch_refresh=0s", "touch_refresh", 0.0),
        ("touch_refresh=500ms", "touch_refresh", 0.5),
        ("upload_parallelism=1", "upload_parallelism", 1),
        ("upload_parallelism=16", "upload_parallelism", 16),
        ("oci-mediatypes=true", "oci_mediatypes", True),
        ("oci_mediatypes=true", "oci_mediatypes", True),
        ("mode=max", "mode", "max"),
        ("mode=min", "mode", "min"),
        ("disable_accept_encoding=true", "disable_accept_encoding", True),
        ("disable_accept_encoding=false", "disable_accept_encoding", False),
        ("retry_mode=standard", "retry_mode", "standard"),
        ("retry_mode=adaptive", "retry_mode", "adaptive"),
        ("retry_max_attempts=1", "retry_max_attempts", 1),
        ("retry_max_attempts=10", "retry_max_attempts", 10),
        ("ignore-error=true", "ignore_error", True),
        ("ignore_error=true", "ignore_error", True),
        ("ignore-error=false", "ignore_error", False),
        ("compression=gzip", "compression", "gzip"),
        ("compression=GZIP", "compression", "gzip"),
        ("compression-level=0", "compression_level", 0),
        ("compression-level=9", "compression_level", 9),
        ("compression_level=6", "compression_level", 6),
        ("force-compression=false", "force_compression", False),
        ("force_compression=false", "force_compression", False),
    ],
)
def test_every_s3_attribute(attribute: str, field: str, expected: Any) -> None:
    assert getattr(s3(f"type=s3,bucket=cache-bucket,{attribute}"), field) == expected


def test_a_pasted_cache_to_string_is_accepted_whole() -> None:
    # What a build farm already passes to buildx --cache-to, every attribute at once.
    spec = parse_target(
        "type=s3,region=us-east-1,bucket=cache-bucket,name=app,mode=max,ignore-error=true,"
        "compression=gzip,compression-level=6,force-compression=false,"
        "disable_accept_encoding=true,retry_mode=adaptive,retry_max_attempts=7,"
        "oci-mediatypes=true,image-manifest=true,upload_parallelism=8,touch_refresh=12h"
    )
    assert (spec.mode, spec.ignore_error, spec.compression) == ("max", True, "gzip")
    assert (spec.compression_level, spec.force_compression) == (6, False)
    assert (spec.disable_accept_encoding, spec.retry_mode, spec.retry_max_attempts) == (
        True,
        "adaptive",
        7,
    )


def test_new_attributes_default_to_buildkits() -> None:
    spec = s3("type=s3,bucket=cache-bucket")
    assert spec.disable_accept_encoding is False
    assert spec.retry_mode is None and spec.retry_max_attempts is None
    assert spec.ignore_error is False
    assert spec.compression is None and spec.compression_level is None
    assert spec.force_compression is False


def test_new_attributes_in_a_json_request_either_spelling() -> None:
    body = {
        "source": {"type": "s3", "bucket": "src-bucket", "retry_max_attempts": 3},
        "target": {
            "type": "s3",
            "bucket": "cache-bucket",
            "ignore-error": True,
            "compression-level": 4,
            "force_compression": False,
            "retry_mode": "standard",
        },
    }
    request = parse_request(body)
    assert request.target.ignore_error is True
    assert request.target.compression_level == 4
    assert request.target.retry_mode == "standard"
    assert isinstance(request.source, S3Spec) and request.source.retry_max_attempts == 3


@pytest.mark.parametrize(
    ("attribute", "field"),
    [
        ("compression=zstd", "target.compression"),
        ("compression=estargz", "target.compression"),
        ("compression=uncompressed", "target.compression"),
        ("force-compression=true", "target.force-compression"),
        ("force_compression=1", "target.force-compression"),
    ],
)
def test_recompression_is_refused_naming_the_attribute(attribute: str, field: str) -> None:
    with pytest.raises(RequestError) as failure:
        parse_spec(f"type=s3,bucket=cache-bucket,{attribute}", "target")
    message = str(failure.value)
    assert message.startswith(f"{field}: ")
    assert "recompression is not done" in message


def test_image_manifest_with_oci_mediatypes() -> None:
    spec = s3("type=s3,bucket=cache-bucket,oci-mediatypes=true,image-manifest=true")
    assert spec.image_manifest and spec.oci_mediatypes
    spec = s3("type=s3,bucket=cache-bucket,oci_mediatypes=true,image_manifest=true")
    assert spec.image_manifest


def test_keys_from_prefixes_and_names() -> None:
    spec = s3("type=s3,bucket=b-1,prefix=ci/,blobs_prefix=objs/,manifests_prefix=refs/,name=x")
    assert spec.blob_key("sha256:00") == "ci/objs/sha256:00"
    assert spec.manifest_key("x") == "ci/refs/x"


def test_quoted_csv_fields_and_key_case() -> None:
    spec = s3('type=s3,"bucket=cache-bucket","name=a;b"')
    assert spec.name == ["a", "b"]
    assert s3("type=s3,BUCKET=cache-bucket,Region=eu-west-1").region == "eu-west-1"


def test_local_source_attributes() -> None:
    spec = parse_spec("type=local,src=/var/cache/bk", "source")
    assert isinstance(spec, LocalSpec)
    assert (spec.src, spec.tag, spec.digest) == ("/var/cache/bk", None, None)
    tagged = parse_spec("type=local,src=/c,tag=v1", "source")
    assert isinstance(tagged, LocalSpec) and tagged.tag == "v1"
    pinned = parse_spec("type=local,src=/c,digest=sha256:" + "a" * 64, "source")
    assert isinstance(pinned, LocalSpec) and pinned.digest == "sha256:" + "a" * 64


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "key",
    [
        "access_key_id",
        "secret_access_key",
        "session_token",
        "Secret_Access_Key",
        "secret-access-key",
        "aws_secret_access_key",
        "AWS_ACCESS_KEY_ID",
    ],
)
def test_credentials_are_refused_without_echoing_them(key: str) -> None:
    with pytest.raises(RequestError) as failure:
        parse_spec(f"type=s3,bucket=cache-bucket,{key}={SECRET}", "target")
    message = str(failure.value)
    assert "credentials are not accepted" in message
    assert key.lower() in message
    assert SECRET not in message
    assert "environment, profile or IRSA" in message


def test_credentials_in_a_json_request_are_refused_too() -> None:
    body = {
        "source": {"type": "local", "src": "/c"},
        "target": {"type": "s3", "bucket": "cache-bucket", "secret_access_key": SECRET},
    }
    with pytest.raises(RequestError) as failure:
        parse_request(body)
    assert "credentials are not accepted" in str(failure.value)
    assert SECRET not in str(failure.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type=s3,bucket=cache-bucket,foo=1", "target.foo: unknown attribute"),
        ("type=s3,bucket=cache-bucket,ref=x", "target.ref: unknown attribute"),
        ("type=local,src=/c,dest=/d", "target.dest: unknown attribute"),
    ],
)
def test_unknown_attributes_are_named(text: str, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace(".", r"\.")):
        parse_spec(text, "target")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type=s3", "target.bucket: required"),
        ("type=s3,bucket=ab", "target.bucket: must be 3-63 characters"),
        ("type=s3,bucket=Cache_Bucket", "target.bucket: must be 3-63 characters"),
        ("type=s3,bucket=a..b", "target.bucket: must be 3-63 characters"),
        ("type=s3,bucket=cache-bucket,upload_parallelism=0", "target.upload_parallelism: "),
        ("type=s3,bucket=cache-bucket,upload_parallelism=65", "target.upload_parallelism: "),
        ("type=s3,bucket=cache-bucket,upload_parallelism=many", "target.upload_parallelism: "),
        ("type=s3,bucket=cache-bucket,touch_refresh=soon", "is not a duration like 24h"),
        ("type=s3,bucket=cache-bucket,touch_refresh=-1h", "target.touch_refresh: "),
        ("type=s3,bucket=cache-bucket,touch_refresh=3600", "is not a duration like 24h"),
        ("type=s3,bucket=cache-bucket,use_path_style=maybe", "target.use_path_style: "),
        ("type=s3,bucket=cache-bucket,oci-mediatypes=perhaps", "target.oci-mediatypes: "),
        ("type=s3,bucket=cache-bucket,endpoint_url=ftp://x", "must be an http:// or https:// URL"),
        ("type=s3,bucket=cache-bucket,endpoint_url=minio:9000", "must be an http:// or https://"),
        ("type=s3,bucket=cache-bucket,name=", "target.name: names must not be empty"),
        ("type=s3,bucket=cache-bucket,name=a;;b", "target.name: names must not be empty"),
        ("type=s3,bucket=cache-bucket,name=../x", "must not contain '.' or '..'"),
        ("type=s3,bucket=cache-bucket,prefix=../x", "target.prefix: "),
        ("type=s3,bucket=cache-bucket,prefix=/abs/", "must not start with '/'"),
        ("type=s3,bucket=cache-bucket,mode=all", "target.mode: "),
        ("type=s3,bucket=cache-bucket,retry_mode=legacy", "target.retry_mode: "),
        ("type=s3,bucket=cache-bucket,retry_max_attempts=0", "target.retry_max_attempts: "),
        ("type=s3,bucket=cache-bucket,retry_max_attempts=x", "target.retry_max_attempts: "),
        ("type=s3,bucket=cache-bucket,disable_accept_encoding=maybe", "disable_accept_encoding"),
        ("type=s3,bucket=cache-bucket,ignore-error=sometimes", "target.ignore-error: "),
        ("type=s3,bucket=cache-bucket,compression-level=10", "target.compression-level: "),
        ("type=s3,bucket=cache-bucket,compression-level=-1", "target.compression-level: "),
        ("type=s3,bucket=cache-bucket,compression-level=high", "target.compression-level: "),
        ("type=s3,bucket=cache-bucket,ignore-error=1,ignore_error=0", "given twice"),
        ("type=s3,bucket=cache-bucket,image-manifest=true", "needs oci-mediatypes=true"),
        ("type=local", "target.src: required"),
        ("type=local,src=", "target.src: must name a directory"),
        ("type=local,src=/c,tag=a,digest=b", "give tag or digest, not both"),
        ("type=gha", "target.type: 'gha' is not supported (s3, registry or local)"),
        ("type=registry", "target.ref: required"),
        ("bucket=cache-bucket", "type: missing (e.g. type=s3, type=registry or type=local)"),
        ("", "type: missing"),
        ("type=s3,bucket", "expected key=value"),
        ("type=s3,=x", "expected key=value"),
        ("type=s3,bucket=cache-bucket,bucket=other", "bucket: given twice"),
    ],
)
def test_bad_values_get_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(RequestError) as failure:
        parse_spec(text, "target")
    text_of_error = str(failure.value)
    assert message in text_of_error
    assert "\n" not in text_of_error
    assert "Traceback" not in text_of_error


def test_a_local_target_is_written_with_dest_not_src() -> None:
    with pytest.raises(RequestError, match=r"target\.dest: required"):
        parse_target("type=local,src=/c")
    spec = parse_target("type=s3,bucket=cache-bucket")
    assert isinstance(spec, S3Spec) and spec.bucket == "cache-bucket"


def test_control_characters_are_refused_in_names() -> None:
    with pytest.raises(RequestError, match="control characters"):
        parse_spec("type=s3,bucket=cache-bucket,name=a\x07b", "target")


def test_go_durations() -> None:
    assert parse_go_duration("24h") == 86400
    assert parse_go_duration("1h30m15s") == 5415
    assert parse_go_duration("1.5h") == 5400
    assert parse_go_duration("250ms") == 0.25
    assert parse_go_duration("0") == 0
    for bad in ("1d", "h", "1h 2m", "abc"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_go_duration(bad)


def test_a_json_request_round_trips() -> None:
    request = parse_request(
        '{"source": {"type": "local", "src": "/c"},'
        ' "target": {"type": "s3", "bucket": "cache-bucket", "name": "a;b",'
        ' "touch_refresh": "1h", "oci-mediatypes": true}}'
    )
    assert isinstance(request.source, LocalSpec)
    assert request.target.name == ["a", "b"]
    assert request.target.touch_refresh == 3600
    assert request.target.oci_mediatypes
    again = parse_request(request.model_dump(mode="json", by_alias=True))
    assert again == request


def test_json_request_errors_name_the_field() -> None:
    with pytest.raises(RequestError, match=r"target\.bucket: required"):
        parse_request({"source": {"type": "local", "src": "/c"}, "target": {"type": "s3"}})
    with pytest.raises(RequestError, match="extra: unknown attribute"):
        parse_request(
            {
                "source": {"type": "local", "src": "/c"},
                "target": {"type": "s3", "bucket": "cache-bucket"},
                "extra": 1,
            }
        )
    with pytest.raises(RequestError, match="Invalid JSON"):
        parse_request("{not json")


def test_schema_describes_both_parts() -> None:
    schema = request_schema()
    assert set(schema["required"]) == {"source", "target"}
    s3_props = schema["$defs"]["S3Spec"]["properties"]
    for name in (
        "bucket",
        "region",
        "prefix",
        "blobs_prefix",
        "manifests_prefix",
        "name",
        "endpoint_url",
        "use_path_style",
        "touch_refresh",
        "upload_parallelism",
        "oci-mediatypes",
        "image-manifest",
        "mode",
        "disable_accept_encoding",
        "retry_mode",
        "retry_max_attempts",
        "ignore-error",
        "compression",
        "compression-level",
        "force-compression",
    ):
        assert name in s3_props, name
    for part in ("S3Spec", "LocalSpec"):
        for name, prop in schema["$defs"][part]["properties"].items():
            assert prop.get("description"), f"{part}.{name} has no description"
    assert not set(s3_props) & {"access_key_id", "secret_access_key", "session_token"}


def test_readme_lists_every_target_attribute() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in readme.splitlines()
        if line.startswith("| `")
    }
    for name in request_schema()["$defs"]["S3Spec"]["properties"]:
        assert name in rows, f"README's attribute table lacks {name}"
