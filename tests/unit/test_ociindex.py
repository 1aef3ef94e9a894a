"""index.json as BuildKit's client rewrites it: Go's struct order, defaults, tag replacement."""

from __future__ import annotations

import json

import pytest

from tasks.backends.local.ociindex import encode_index, insert_tagged, read_index
from tasks.cacheformat import Descriptor, FormatError

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def put(old: bytes, digest: str, size: int, tag: str) -> bytes:
    return encode_index(insert_tagged(read_index(old), Descriptor(MANIFEST, digest, size), tag))


def test_a_new_index_is_written_exactly_as_go_marshals_it() -> None:
    # Written out by hand from ocispecs.Index / Descriptor field order and omitempty rules.
    expected = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
        '"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"digest":"{D1}","size":123,'
        '"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}'
    )
    assert put(b"", D1, 123, "latest") == expected.encode()


def test_the_same_tag_is_replaced_and_other_entries_keep_their_order() -> None:
    first = put(b"", D1, 1, "latest")
    second = put(first, D2, 2, "v1")
    third = put(second, D3, 3, "latest")
    entries = json.loads(third)["manifests"]
    tags = [(e["digest"], e["annotations"]["org.opencontainers.image.ref.name"]) for e in entries]
    assert tags == [(D2, "v1"), (D3, "latest")]


def test_an_entry_named_by_image_is_not_a_tag_and_stays() -> None:
    old = json.dumps(
        {
            "manifests": [
                {
                    "mediaType": MANIFEST,
                    "digest": D1,
                    "size": 1,
                    "annotations": {
                        "io.containerd.image.name": "docker.io/library/app:latest",
                        "org.opencontainers.image.ref.name": "latest",
                    },
                }
            ]
        }
    ).encode()
    entries = json.loads(put(old, D2, 2, "latest"))["manifests"]
    assert [e["digest"] for e in entries] == [D1, D2]


def test_existing_entries_are_re_encoded_as_go_would() -> None:
    # Keys in any case and order, unknown fields, spaces: Go's round trip normalises them.
    old = (
        b'{ "MANIFESTS": [ {"Size": 7, "annotations": {"z": "1", "a": "2"}, "digest": "'
        + D1.encode()
        + b'", "mediaType": "m", "unknown": true, "platform": {"os": "linux",'
        b' "architecture": "amd64"}, "urls": [], "data": "aGk="} ],'
        b' "schemaVersion": 2, "extra": 1 }'
    )
    data = put(old, D2, 2, "latest")
    head = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
        f'"manifests":[{{"mediaType":"m","digest":"{D1}","size":7,'
        '"annotations":{"a":"2","z":"1"},"data":"aGk=",'
        '"platform":{"architecture":"amd64","os":"linux"}},'
    )
    assert data.decode().startswith(head)


@pytest.mark.parametrize(
    "bad",
    [b"{", b"[]", b'{"manifests": {}}', b'{"manifests": [{"size": "x"}]}', b" "],
)
def test_an_unreadable_index_is_refused(bad: bytes) -> None:
    with pytest.raises(FormatError):
        read_index(bad)
