"""Marshalling: the normalised config, its descriptors, the S3 form; idempotent normalising."""

from __future__ import annotations

import gc
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.cacheformat import (
    ANNOTATION_CREATED_AT,
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_CACHE_CONFIG,
    CacheGraph,
    Descriptor,
    EmptyCacheError,
    FormatError,
    GoTime,
    config_descriptor,
    decode_config,
    descriptors_from_annotations,
    encode_config,
    marshal,
    normalize,
    parse_graph,
    s3_config_bytes,
)
from tasks.cacheformat.gcpause import paused_gc

DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


def blob(n: int, media_type: str = OCI_GZIP, **annotations: str) -> Descriptor:
    return Descriptor(
        media_type, dg(1000 + n), 10 * n, {ANNOTATION_UNCOMPRESSED: dg(2000 + n)} | annotations
    )


def t(text: str) -> GoTime:
    return GoTime.parse(text)


def test_empty_cache_is_not_exported() -> None:
    g = CacheGraph()
    g.add_record(dg(1))
    with pytest.raises(EmptyCacheError) as caught:
        marshal(g)
    assert str(caught.value) == "nothing to export: the cache has no layers"
    assert isinstance(caught.value, FormatError)
    with pytest.raises(EmptyCacheError):
        marshal(CacheGraph())
    # BuildKit's marshaller itself writes the records; only the export is skipped.
    assert encode_config(marshal(g, allow_empty=True).config) == (
        f'{{"records":[{{"digest":"{dg(1)}"}}]}}'.encode()
    )


def test_keeps_the_newest_result_and_shares_layers() -> None:
    g = CacheGraph()
    base = g.add_record(
        dg(1),
        results=[
            (t("2024-01-01T00:00:00Z"), [blob(1)]),
            (t("2024-01-01T05:00:00+06:00"), [blob(2)]),  # 23:00 the day before: older
            (t("2024-01-01T00:00:00.5Z"), [blob(1), blob(3, DOCKER_GZIP)]),
        ],
    )
    assert base is not None
    g.add_record(dg(2), [[("", base)]], [(t("2023-01-01T00:00:00Z"), [blob(1), blob(3)])])
    m = marshal(g)
    data = json.loads(encode_config(m.config))
    assert data["layers"] == [
        {"blob": dg(1001), "parent": -1},
        {"blob": dg(1003)},  # on layer 0, shared by both records
    ]
    assert data["records"] == [
        {"layers": [{"layer": 1, "createdAt": "2024-01-01T00:00:00.5Z"}], "digest": dg(1)},
        {
            "layers": [{"layer": 1, "createdAt": "2023-01-01T00:00:00Z"}],
            "digest": dg(2),
            "inputs": [[{"link": 0}]],
        },
    ]
    # One descriptor per blob, in config order, with OCI media types and annotations kept.
    assert m.layers == [blob(1), blob(3)]
    assert m.descriptors()[dg(1003)].media_type == OCI_GZIP


def test_first_of_equally_new_results_wins() -> None:
    g = CacheGraph()
    g.add_record(dg(1), results=[(t("2024-01-01T00:00:00Z"), [blob(5)])])
    g.add_record(dg(1), results=[(t("2024-01-01T00:00:00Z"), [blob(1), blob(2)])])
    config = marshal(g).config
    assert [layer.blob for layer in config.layers] == [dg(1005)]


def test_sorts_like_buildkit() -> None:
    g = CacheGraph()
    # Same blob on two parent chains: sorted by blob, then by parent index before sorting.
    r1 = g.add_record(dg(9), results=[(t("2024-01-01T00:00:01Z"), [blob(5), blob(1)])])
    r2 = g.add_record(dg(8), results=[(t("2024-01-01T00:00:02Z"), [blob(4), blob(1)])])
    assert r1 is not None and r2 is not None
    # Records by digest, then number of slots, slot length, selector, linked digest.
    g.add_record(dg(7), [[("b", r1)]])
    g.add_record(dg(7), [[("a", r1)]])
    g.add_record(dg(7), [[("a", r2)]])
    g.add_record(dg(7), [[("a", r2)], [("", r1)]])
    g.add_record(dg(7), [[("z", r1), ("z", r2)]])
    data = json.loads(encode_config(marshal(g).config))
    # Leaves are found from the roots in the order they were created: the first leaf links
    # to dg(9), so its chain (1001 on 1005) is written first and sorts first, though its
    # parent ends up after 1004.
    assert [(layer["blob"], layer.get("parent", 0)) for layer in data["layers"]] == [
        (dg(1001), 3),
        (dg(1001), 2),
        (dg(1004), -1),
        (dg(1005), -1),
    ]
    digests = [r["digest"] for r in data["records"]]
    assert digests == [dg(7)] * 5 + [dg(8), dg(9)]
    assert [r["inputs"] for r in data["records"][:5]] == [
        [[{"selector": "a", "link": 5}]],
        [[{"selector": "a", "link": 6}]],
        [[{"selector": "b", "link": 6}]],
        [[{"selector": "z", "link": 5}, {"selector": "z", "link": 6}]],
        [[{"selector": "a", "link": 5}], [{"link": 6}]],
    ]


def test_links_to_one_record_keep_the_order_they_were_added_in() -> None:
    # BuildKit leaves equal link indexes in Go's small-map order, which in practice is
    # the order the links were added (the golden fixtures show it).
    g = CacheGraph()
    x = g.add_record(dg(1), results=[(t("2024-01-01T00:00:00Z"), [blob(1)])])
    assert x is not None
    g.add_record(dg(2), [[("sha256:deadbeef", x), ("", x), ("/a", x)]])
    data = json.loads(encode_config(marshal(g).config))
    assert data["records"][1]["inputs"] == [
        [{"selector": "sha256:deadbeef", "link": 0}, {"link": 0}, {"selector": "/a", "link": 0}]
    ]


def test_s3_form_and_config_descriptor() -> None:
    g = CacheGraph()
    created = "2024-01-01T03:00:00.250+03:00"
    g.add_record(
        dg(1),
        results=[
            (
                t("2024-01-01T00:00:00Z"),
                [blob(1, DOCKER_GZIP, **{ANNOTATION_CREATED_AT: created}), blob(2)],
            )
        ],
    )
    m = marshal(g)
    data = s3_config_bytes(m)
    assert json.loads(data)["layers"] == [
        {
            "blob": dg(1001),
            "parent": -1,
            "annotations": {
                "mediaType": OCI_GZIP,
                "diffID": dg(2001),
                "size": 10,
                "createdAt": "2024-01-01T00:00:00.25Z",
            },
        },
        {
            "blob": dg(1002),
            "annotations": {
                "mediaType": OCI_GZIP,
                "diffID": dg(2002),
                "size": 20,
                "createdAt": "0001-01-01T00:00:00Z",
            },
        },
    ]
    # Reading the S3 form back gives the same normalised config.
    assert normalize(data) == encode_config(m.config)
    plain = encode_config(m.config)
    descriptor = config_descriptor(plain)
    assert descriptor == Descriptor(
        MEDIA_TYPE_CACHE_CONFIG, "sha256:" + hashlib.sha256(plain).hexdigest(), len(plain)
    )
    assert descriptor.to_json() == (
        f'{{"mediaType":"{MEDIA_TYPE_CACHE_CONFIG}","digest":"{descriptor.digest}",'
        f'"size":{len(plain)}}}'
    )


def test_s3_form_needs_a_diffid() -> None:
    g = CacheGraph()
    g.add_record(dg(1), results=[(t("2024-01-01T00:00:00Z"), [Descriptor(OCI_GZIP, dg(5), 1)])])
    with pytest.raises(FormatError, match=r"^layers\[0\]: invalid descriptor without uncompressed"):
        s3_config_bytes(marshal(g))


def test_normalize_errors_are_one_line() -> None:
    with pytest.raises(FormatError) as caught:
        normalize(b'{"layers":[{"blob":"sha256:00"}]}')
    assert str(caught.value).startswith("layers[0].blob: digest must be sha256:<64 lower-case hex>")


# --- idempotence --------------------------------------------------------------------------

MEDIA = (OCI_GZIP, DOCKER_GZIP, "application/vnd.oci.image.layer.v1.tar", "x/unknown")
hexes = st.integers(0, 2**256 - 1).map(lambda n: f"sha256:{n:064x}")
times = st.builds(
    lambda day, second, nanos, zone: f"2024-01-{day:02d}T00:00:{second:02d}{nanos}{zone}",
    st.integers(1, 3),
    st.integers(0, 3),
    st.sampled_from(["", ".5", ".123456789", ".000000001"]),
    st.sampled_from(["Z", "+01:00", "-00:30", "+00:00"]),
)
selectors = st.sampled_from(["", "/src", "sha256:deadbeef", "sel<&>é", "\u2028x"])


@st.composite
def s3_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A config as BuildKit's S3 importer reads it: no loops, unique keys, dupes allowed."""
    blobs = draw(st.lists(hexes, min_size=1, max_size=5, unique=True))
    layers = []
    for i in range(draw(st.integers(1, 8))):
        parent = draw(st.sampled_from([-1, *range(i)]))
        layer: dict[str, Any] = {
            "blob": draw(st.sampled_from(blobs)),
            "annotations": {
                "mediaType": draw(st.sampled_from(MEDIA)),
                "diffID": draw(hexes),
                "size": draw(st.integers(0, 10**6)),
                "createdAt": draw(times | st.just("0001-01-01T00:00:00Z")),
            },
        }
        if parent:
            layer["parent"] = parent
        layers.append(layer)
    count = draw(st.integers(1, 9))
    keys = draw(st.lists(hexes, min_size=count, max_size=count, unique=True))
    records: list[dict[str, Any]] = []
    primary: list[int] = []  # where each key's first record sits in `records`
    for i in range(count):
        record: dict[str, Any] = {"digest": keys[i]}
        if i and draw(st.booleans()):
            record["inputs"] = [
                [
                    {"selector": draw(selectors), "link": primary[draw(st.integers(0, i - 1))]}
                    for _ in range(draw(st.integers(1, 3)))
                ]
                for _ in range(draw(st.integers(1, 3)))
            ]
        results = [
            {"layer": draw(st.integers(0, len(layers) - 1)), "createdAt": draw(times)}
            for _ in range(draw(st.integers(0, 2)))
        ]
        if results:
            record["layers"] = results
        if draw(st.booleans()):
            record["chains"] = [
                {
                    "layers": draw(st.lists(st.integers(0, len(layers) - 1), max_size=3)),
                    "createdAt": draw(times),
                }
            ]
        primary.append(len(records))
        records.append(record)
        if draw(st.integers(0, 5)) == 0:
            # The same key exported twice (with other results), as merged caches have it.
            copy = json.loads(json.dumps(record))
            copy["layers"] = [
                {"layer": draw(st.integers(0, len(layers) - 1)), "createdAt": draw(times)}
            ]
            records.append(copy)
        if draw(st.integers(0, 8)) == 0:
            records.append({"digest": "random:" + keys[i][7:19]})
    # Shuffle the records (links follow), as a config on disk is not in dependency order.
    order = draw(st.permutations(range(len(records))))
    position = {old: new for new, old in enumerate(order)}
    shuffled = [records[old] for old in order]
    for record in shuffled:
        for slot in record.get("inputs", []):
            for link in slot:
                link["link"] = position[link["link"]]
    return {"layers": layers, "records": shuffled}


def _pipeline(data: bytes) -> tuple[bytes, bytes]:
    cfg = decode_config(data)
    m = marshal(parse_graph(cfg, descriptors_from_annotations(cfg)), allow_empty=True)
    return encode_config(m.config), s3_config_bytes(m)


def _meaning(canonical: bytes) -> list[tuple[object, ...]]:
    """A config without its indexes: each record's digest, its links by linked digest and
    selector, and its result as blobs root first with the creation time."""
    data = json.loads(canonical)
    layers = data.get("layers", [])
    records = data.get("records", [])

    def chain(index: int) -> tuple[str, ...]:
        blobs: list[str] = []
        while index != -1:
            blobs.append(layers[index]["blob"])
            index = layers[index].get("parent", 0)
        return tuple(reversed(blobs))

    out = []
    for record in records:
        inputs = tuple(
            tuple(
                sorted((link.get("selector", ""), records[link["link"]]["digest"]) for link in slot)
            )
            for slot in record.get("inputs", [])
        )
        results = tuple((chain(r["layer"]), r["createdAt"]) for r in record.get("layers", []))
        out.append((record["digest"], inputs, results))
    return sorted(out)


@settings(max_examples=150, deadline=None)
@given(s3_configs())
def test_normalising_again_keeps_the_meaning(value: dict[str, Any]) -> None:
    # BuildKit's output depends on the order the graph was built in (its maps are walked
    # in insertion order here), so the S3 form read back is not always the same bytes: a
    # blob on two parent chains is ordered by where its parents were first written. What
    # it says must be the same.
    data = json.dumps(value, ensure_ascii=False).encode()
    canonical, s3_form = _pipeline(data)
    assert normalize(data) == canonical
    again, _ = _pipeline(s3_form)
    assert _meaning(again) == _meaning(canonical)
    assert normalize(s3_form) == again


def test_collector_is_restored_after_large_work() -> None:
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(FormatError):
        normalize(b"[]")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
