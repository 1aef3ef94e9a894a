"""Cache config model: strict decoding with located errors, Go-exact encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.cacheformat import (
    ANNOTATION_CREATED_AT,
    ANNOTATION_UNCOMPRESSED,
    ZERO_TIME,
    CacheConfig,
    CacheInput,
    CacheLayer,
    CacheRecord,
    CacheResult,
    ChainedResult,
    Descriptor,
    FormatError,
    GoTime,
    LayerAnnotations,
    check_digest,
    decode_config,
    descriptors_from_annotations,
    encode_config,
)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64
T1 = "2024-01-19T07:42:29.006933274Z"


def doc(value: Any) -> bytes:
    return json.dumps(value).encode()


def valid() -> dict[str, Any]:
    return {
        "layers": [
            {
                "blob": A,
                "parent": -1,
                "annotations": {"mediaType": "m", "diffID": B, "size": 3, "createdAt": T1},
            }
        ],
        "records": [
            {"layers": [{"layer": 0, "createdAt": T1}], "digest": C},
            {"digest": B, "inputs": [[{"selector": "/src", "link": 0}]]},
        ],
    }


def refusal(value: Any) -> str:
    with pytest.raises(FormatError) as caught:
        decode_config(value if isinstance(value, bytes) else doc(value))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_decodes_what_buildkit_writes() -> None:
    cfg = decode_config(doc(valid()))
    assert cfg.layers == (CacheLayer(A, -1, LayerAnnotations("m", B, 3, GoTime.parse(T1))),)
    assert cfg.records[0] == CacheRecord(C, (), (CacheResult(0, GoTime.parse(T1)),), ())
    assert cfg.records[1].inputs == ((CacheInput("/src", 0),),)


def test_go_zero_values() -> None:
    cfg = decode_config(
        doc(
            {
                "layers": [{"blob": A}, {"blob": A, "parent": None, "annotations": None}],
                "records": [
                    {
                        "digest": C,
                        "layers": [{"layer": None, "createdAt": None}],
                        "inputs": [[{"link": 1}], None, []],
                        "chains": [{"layers": None, "createdAt": T1}],
                    }
                ],
            }
        )
    )
    # A missing parent is layer 0, as Go reads it.
    assert cfg.layers == (CacheLayer(A, 0), CacheLayer(A, 0))
    record = cfg.records[0]
    assert record.results == (CacheResult(0, ZERO_TIME),)
    assert record.inputs == ((CacheInput("", 1),), (), ())
    assert record.chains == (ChainedResult((), GoTime.parse(T1)),)
    assert decode_config(b"null") == CacheConfig()
    assert decode_config(b"{}") == CacheConfig()


def test_keys_are_matched_like_go() -> None:
    value = {
        "LAYERS": [{"Blob": A, "PARENT": -1, "unknown": [1, {"x": None}]}],
        "Records": [{"Digest": C, "Inputs": [[{"Link": 0, "SELECTOR": "s"}]]}],
        "extra": "ignored",
    }
    cfg = decode_config(doc(value))
    assert cfg.layers == (CacheLayer(A, -1),)
    assert cfg.records == (CacheRecord(C, ((CacheInput("s", 0),),)),)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda v: v.update(layers={}), "layers: expected an array, got object"),
        (lambda v: v["layers"].append("x"), "layers[1]: expected an object, got string"),
        (lambda v: v["layers"][0].update(blob=None), "layers[0].blob: layer has no blob digest"),
        (
            lambda v: v["layers"][0].update(blob="sha256:" + "A" * 64),
            "layers[0].blob: digest must be sha256:<64 lower-case hex>",
        ),
        (
            lambda v: v["layers"][0].update(blob="sha512:" + "a" * 128),
            "layers[0].blob: digest algorithm 'sha512' is not supported",
        ),
        (lambda v: v["layers"][0].update(blob=7), "layers[0].blob: digest must be a string"),
        (lambda v: v["layers"][0].update(parent="1"), "layers[0].parent: expected an integer"),
        (lambda v: v["layers"][0].update(parent=1.0), "layers[0].parent: expected an integer"),
        (lambda v: v["layers"][0].update(parent=True), "layers[0].parent: expected an integer"),
        (lambda v: v["layers"][0].update(parent=2**63), "layers[0].parent: integer out of range"),
        (
            lambda v: v["layers"][0]["annotations"].update(size=-1),
            "layers[0].annotations.size: size must not be negative",
        ),
        (
            lambda v: v["layers"][0]["annotations"].update(diffID="md5:x"),
            "layers[0].annotations.diffID: digest",
        ),
        (
            lambda v: v["layers"][0]["annotations"].update(mediaType=1),
            "layers[0].annotations.mediaType: expected a string, got number",
        ),
        (
            lambda v: v["layers"][0]["annotations"].update(createdAt="yesterday"),
            "layers[0].annotations.createdAt: not an RFC 3339 time",
        ),
        (
            lambda v: v["records"][0]["layers"][0].update(createdAt="2024-02-30T00:00:00Z"),
            "records[0].layers[0].createdAt: day out of range",
        ),
        (
            lambda v: v["records"][0]["layers"][0].update(createdAt=5),
            "records[0].layers[0].createdAt: expected an RFC 3339 time string, got number",
        ),
        (
            lambda v: v["records"][0]["layers"][0].update(layer="0"),
            "records[0].layers[0].layer: expected an integer, got string",
        ),
        (lambda v: v["records"][0].pop("digest"), "records[0].digest: record has no digest"),
        (lambda v: v["records"][0].update(digest="sha256:12"), "records[0].digest: digest must"),
        (
            lambda v: v["records"][1]["inputs"][0][0].update(link="0"),
            "records[1].inputs[0][0].link: expected an integer, got string",
        ),
        (
            lambda v: v["records"][1]["inputs"][0][0].update(link=0.5),
            "records[1].inputs[0][0].link: expected an integer, got 0.5",
        ),
        (
            lambda v: v["records"][1]["inputs"][0][0].update(selector=["x"]),
            "records[1].inputs[0][0].selector: expected a string, got array",
        ),
        (
            lambda v: v["records"][1]["inputs"].append({"link": 0}),
            "records[1].inputs[1]: expected an array, got object",
        ),
        (
            lambda v: v["records"][1].update(chains=[{"layers": [0, "1"], "createdAt": T1}]),
            "records[1].chains[0].layers[1]: expected an integer, got string",
        ),
    ],
)
def test_refusals_name_the_place(mutate: Any, expected: str) -> None:
    value = valid()
    mutate(value)
    assert expected in refusal(value)


def test_refuses_documents_that_are_not_configs() -> None:
    assert refusal(b"not json").startswith("not JSON")
    assert "unexpected data after the JSON value" in refusal(doc(valid()) + b" {}")
    assert refusal(b"[]") == "config: expected an object, got array"
    assert "not JSON" in refusal(b'{"layers": [{"blob": NaN}]}')


def test_random_record_digests_are_accepted() -> None:
    cfg = decode_config(doc({"records": [{"digest": "random:abc"}]}))
    assert cfg.records[0].digest == "random:abc"
    assert "random: digest without a key" in refusal({"records": [{"digest": "random:"}]})


def test_check_digest() -> None:
    assert check_digest(A, "x") == A
    for bad in ("", A.upper(), A[:-1], A + "0", "sha256:" + "g" * 64, None, 3):
        with pytest.raises(FormatError) as caught:
            check_digest(bad, "here")
        assert str(caught.value).startswith("here: digest")


def test_encodes_like_go() -> None:
    t = GoTime.parse("2020-03-08T03:39:46.500+06:00")
    cfg = CacheConfig(
        layers=(
            CacheLayer(A, -1),
            CacheLayer(B, 0),
            CacheLayer(C, 1, LayerAnnotations()),
            CacheLayer(A, 2, LayerAnnotations("m<", B, 7, t)),
        ),
        records=(
            CacheRecord(C),
            CacheRecord(
                A,
                inputs=((CacheInput("", 0), CacheInput("\u2028&", 1)), ()),
                results=(CacheResult(3, t),),
                chains=(ChainedResult((0, 1), ZERO_TIME), ChainedResult((), t)),
            ),
        ),
    )
    expected = (
        '{"layers":[{"blob":"A","parent":-1},{"blob":"B"},'
        '{"blob":"C","parent":1,"annotations":{"createdAt":"0001-01-01T00:00:00Z"}},'
        '{"blob":"A","parent":2,"annotations":{"mediaType":"m\\u003c","diffID":"B","size":7,'
        '"createdAt":"2020-03-08T03:39:46.5+06:00"}}],'
        '"records":[{"digest":"C"},'
        '{"layers":[{"layer":3,"createdAt":"2020-03-08T03:39:46.5+06:00"}],'
        '"chains":[{"layers":[0,1],"createdAt":"0001-01-01T00:00:00Z"},'
        '{"layers":null,"createdAt":"2020-03-08T03:39:46.5+06:00"}],'
        '"digest":"A","inputs":[[{"link":0},{"selector":"\\u2028\\u0026","link":1}],null]}]}'
    )
    expected = expected.replace('"A"', f'"{A}"').replace('"B"', f'"{B}"').replace('"C"', f'"{C}"')
    assert encode_config(cfg) == expected.encode()
    assert encode_config(CacheConfig()) == b"{}"
    assert (
        encode_config(CacheConfig(records=(CacheRecord(A),)))
        == f'{{"records":[{{"digest":"{A}"}}]}}'.encode()
    )


def test_encoding_refuses_times_go_cannot_write() -> None:
    far = GoTime(GoTime.parse("9999-12-31T23:59:59Z").unix_seconds + 1)
    with pytest.raises(FormatError, match="year outside"):
        encode_config(CacheConfig(records=(CacheRecord(A, results=(CacheResult(0, far),)),)))


def test_descriptors_from_annotations() -> None:
    value = valid()
    value["layers"].append(
        {
            "blob": A,
            "annotations": {"mediaType": "n", "diffID": C, "size": 9, "createdAt": None},
        }
    )
    value["layers"].append(
        {
            "blob": B,
            "annotations": {
                "mediaType": "n",
                "diffID": C,
                "createdAt": "2024-01-01T03:00:00.10+03:00",
            },
        }
    )
    descriptors = descriptors_from_annotations(decode_config(doc(value)))
    # The last entry of a blob wins; a zero time gives no createdat annotation.
    assert descriptors == {
        A: Descriptor("n", A, 9, {ANNOTATION_UNCOMPRESSED: C}),
        B: Descriptor(
            "n",
            B,
            0,
            {ANNOTATION_UNCOMPRESSED: C, ANNOTATION_CREATED_AT: "2024-01-01T03:00:00.1+03:00"},
        ),
    }


def test_descriptors_need_annotations_and_a_diffid() -> None:
    value = valid()
    value["layers"].append({"blob": B, "parent": -1})
    with pytest.raises(FormatError, match=r"^layers\[1\]: cache layer with missing annotations$"):
        descriptors_from_annotations(decode_config(doc(value)))
    value["layers"][1]["annotations"] = {"size": 1}
    with pytest.raises(FormatError, match=r"^layers\[1\].annotations.diffID: cache layer with"):
        descriptors_from_annotations(decode_config(doc(value)))


# --- round trip ---------------------------------------------------------------------------

digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
record_digests = digests | st.text(min_size=1, max_size=8).map(lambda s: "random:" + s)
ints = st.integers(-(2**63), 2**63 - 1)
small = st.integers(-3, 20)
times = st.builds(
    GoTime,
    st.integers(-62135596800 + 86_400, 253402300799 - 86_400),
    st.integers(0, 999_999_999) | st.just(0),
    st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: m * 60) | st.just(0),
)
layer_annotations = st.builds(
    LayerAnnotations,
    st.text(max_size=12),
    st.just("") | digests,
    st.integers(0, 2**63 - 1) | st.just(0),
    times,
)
layers = st.builds(CacheLayer, digests, small | ints, st.none() | layer_annotations)
inputs = st.builds(CacheInput, st.text(max_size=10), small | ints)
records = st.builds(
    CacheRecord,
    record_digests,
    st.lists(st.lists(inputs, max_size=3).map(tuple), max_size=3).map(tuple),
    st.lists(st.builds(CacheResult, small, times), max_size=2).map(tuple),
    st.lists(
        st.builds(ChainedResult, st.lists(small, max_size=3).map(tuple), times), max_size=2
    ).map(tuple),
)
configs = st.builds(
    CacheConfig,
    st.lists(layers, max_size=5).map(tuple),
    st.lists(records, max_size=5).map(tuple),
)


@settings(max_examples=150)
@given(configs)
def test_encode_decode_encode_is_the_identity(cfg: CacheConfig) -> None:
    data = encode_config(cfg)
    again = decode_config(data)
    assert encode_config(again) == data
    assert again == cfg
    # Go writes compact JSON that any JSON reader takes.
    assert isinstance(json.loads(data), dict)


@settings(max_examples=100)
@given(st.text())
def test_selectors_with_any_unicode_survive(selector: str) -> None:
    cfg = CacheConfig(records=(CacheRecord(A, ((CacheInput(selector, 0),),)),))
    assert decode_config(encode_config(cfg)).records[0].inputs[0][0].selector == selector
