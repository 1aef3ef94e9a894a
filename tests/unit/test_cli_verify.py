"""The verify rules on configs alone (no bucket): what BuildKit's S3 importer would refuse."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasks.request import S3Spec
from tasks.verify import cache_from_line as line_for
from tasks.verify import check_config

BLOB = "sha256:" + "1" * 64
DIFF = "sha256:" + "2" * 64
KEY = "manifests/buildkit"
CREATED = "2026-01-01T00:00:00.5Z"


def config(**layer_overrides: Any) -> dict[str, Any]:
    layer: dict[str, Any] = {
        "blob": BLOB,
        "parent": -1,
        "annotations": {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "diffID": DIFF,
            "size": 1234,
            "createdAt": CREATED,
        },
    }
    layer.update(layer_overrides)
    return {
        "layers": [layer],
        "records": [
            {"digest": "sha256:" + "3" * 64},
            {
                "layers": [{"layer": 0, "createdAt": CREATED}],
                "digest": "sha256:" + "4" * 64,
                "inputs": [[{"link": 0}]],
            },
        ],
    }


def problems(document: dict[str, Any] | bytes) -> list[str]:
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    return [str(p) for p in check_config(data, KEY)[1]]


def test_a_sound_config_has_no_problems() -> None:
    cfg, found = check_config(json.dumps(config()).encode(), KEY)
    assert found == []
    assert cfg is not None and len(cfg.layers) == 1 and len(cfg.records) == 2


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{not json", "the config does not parse"),
        (b"", "the config does not parse"),
        (json.dumps(config()).encode() + b" {}", "the config does not parse"),
        (b'{"layers": "many"}', "the config does not parse"),
    ],
)
def test_configs_that_do_not_parse(data: bytes, expected: str) -> None:
    found = problems(data)
    assert len(found) == 1
    assert found[0].startswith(f"{KEY}: {expected}")


def test_a_layer_without_annotations_is_refused() -> None:
    doc = config()
    del doc["layers"][0]["annotations"]
    assert problems(doc) == [
        f"{KEY}: layers[0] ({BLOB}): no annotations (BuildKit refuses the whole cache)"
    ]


def test_a_layer_without_diffid_is_refused() -> None:
    doc = config()
    del doc["layers"][0]["annotations"]["diffID"]
    assert problems(doc) == [
        f"{KEY}: layers[0] ({BLOB}): no diffID (BuildKit refuses the whole cache)"
    ]


def test_a_layer_without_size_is_refused() -> None:
    doc = config()
    doc["layers"][0]["annotations"]["size"] = 0
    assert problems(doc) == [f"{KEY}: layers[0] ({BLOB}): no size in its annotations"]


def test_records_that_buildkit_would_not_parse() -> None:
    doc = config()
    doc["records"][1]["inputs"] = [[{"link": 7}]]
    found = problems(doc)
    assert len(found) == 1
    assert found[0].startswith(f"{KEY}: the records do not parse: ")
    assert "invalid record ID" in found[0]


def test_an_empty_cache_is_not_sound() -> None:
    assert problems({"layers": [], "records": []}) == [
        f"{KEY}: the cache holds no layers: nothing would be imported"
    ]


def test_the_buildx_line() -> None:
    spec = S3Spec(bucket="cache-bucket", name=["main", "pr-1"])
    assert line_for(spec, "eu-west-1") == (
        "docker buildx build --cache-from type=s3,region=eu-west-1,bucket=cache-bucket,name=main ."
    )
    custom = S3Spec(
        bucket="cache-bucket",
        region="us-east-2",
        prefix="ci/",
        blobs_prefix="b/",
        manifests_prefix="m/",
        endpoint_url="http://minio:9000",
        use_path_style=True,
    )
    assert line_for(custom) == (
        "docker buildx build --cache-from type=s3,region=us-east-2,bucket=cache-bucket,"
        "name=buildkit,prefix=ci/,blobs_prefix=b/,manifests_prefix=m/,"
        "endpoint_url=http://minio:9000,use_path_style=true ."
    )
    assert "region=<region>" in line_for(S3Spec(bucket="cache-bucket"))
