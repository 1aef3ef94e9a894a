"""Merging into a stored name: BuildKit's parse+marshal of both configs, then the bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tasks.cacheformat import (
    FormatError,
    GoTime,
    decode_config,
    descriptors_from_annotations,
    encode_config,
    marshal,
    normalize,
    parse_graph,
    s3_config_bytes,
)
from tasks.cacheformat.merge import (
    MergeLimits,
    merge_configs,
    read_stored,
    stored_blobs,
)
from tests.unit.test_cacheformat_marshal import s3_configs

NOW = GoTime.parse("2026-01-20T00:00:00Z")
DAY = 86_400.0


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _concat_json(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """The two configs as one JSON document, written independently of the module under test.

    In JSON a missing ``parent`` is 0 and a missing ``link`` is 0: both are indexes and
    move with the second config.
    """
    lo, ro = len(first.get("layers", [])), len(first.get("records", []))
    second = json.loads(json.dumps(second))
    for layer in second.get("layers", []):
        parent = layer.get("parent", 0)
        layer["parent"] = parent + lo if parent >= 0 else parent
    for record in second.get("records", []):
        for slot in record.get("inputs") or []:
            for link in slot:
                link["link"] = link.get("link", 0) + ro
        for result in record.get("layers") or []:
            result["layer"] = result.get("layer", 0) + lo
        for chain in record.get("chains") or []:
            chain["layers"] = [i + lo for i in chain.get("layers") or []]
    return {
        "layers": first.get("layers", []) + second.get("layers", []),
        "records": first.get("records", []) + second.get("records", []),
    }


def _s3_form(data: bytes) -> bytes:
    cfg = decode_config(data)
    return s3_config_bytes(
        marshal(parse_graph(cfg, descriptors_from_annotations(cfg)), allow_empty=True)
    )


def _one_place_per_blob(data: bytes) -> bool:
    """Whether every blob of the normalised config sits at one place in the layer chains.

    Where one blob sits under several parents, BuildKit sorts those layers by their index
    in its input, so its output is not a fixed point of its own parse + marshal; the
    properties of merged bytes below hold for everything else.
    """
    blobs = [layer.blob for layer in decode_config(_s3_form(data)).layers]
    return len(blobs) == len(set(blobs))


def _merge(existing: bytes | None, new: bytes, **kwargs: Any) -> Any:
    return merge_configs(
        None if existing is None else read_stored(existing), decode_config(new), now=NOW, **kwargs
    )


@settings(max_examples=120, deadline=None)
@given(s3_configs(), s3_configs())
def test_merge_is_parse_and_marshal_of_both_configs(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    concat = _json(_concat_json(first, second))
    assume(_one_place_per_blob(concat))
    merged = _merge(_json(first), _json(second))
    assert encode_config(merged.marshalled.config) == normalize(concat)
    assert merged.s3_config == _s3_form(concat)
    # A fixed point of the normaliser, in both forms.
    assert normalize(merged.s3_config) == encode_config(merged.marshalled.config)
    assert _s3_form(merged.s3_config) == merged.s3_config
    assert merged.counts.records_after == merged.counts.records_merged
    assert merged.counts.records_after == len(decode_config(merged.s3_config).records)


@settings(max_examples=120, deadline=None)
@given(s3_configs())
def test_merging_a_config_with_itself_changes_nothing(value: dict[str, Any]) -> None:
    assume(_one_place_per_blob(_json(value)))
    stored = _s3_form(_json(value))
    merged = _merge(stored, stored)
    assert merged.s3_config == stored


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(s3_configs(), s3_configs())
def test_merging_the_same_export_again_changes_nothing(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    # An empty chain is a result with no layer, which hides an equally new real one only
    # until the marshaller drops it: BuildKit's quirk, not a property of merging.
    for config in (first, second):
        assume(all(c["layers"] for r in config["records"] for c in r.get("chains", [])))
    assume(_one_place_per_blob(_json(_concat_json(first, second))))
    once = _merge(_json(first), _json(second)).s3_config
    assert _merge(once, _s3_form(_json(second))).s3_config == once


@pytest.mark.slow(seconds=100)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    s3_configs(),
    s3_configs(),
    st.integers(1, 12),
    st.sampled_from([None, 0.0, 400 * DAY, 5000 * DAY]),
    st.data(),
)
def test_bounded_merges_stay_within_bounds_and_normalised(
    first: dict[str, Any],
    second: dict[str, Any],
    max_records: int,
    max_age: float | None,
    data: st.DataObject,
) -> None:
    for config in (first, second):  # see test_merging_the_same_export_again_changes_nothing
        assume(all(c["layers"] for r in config["records"] for c in r.get("chains", [])))
    assume(_one_place_per_blob(_json(_concat_json(first, second))))
    blobs = sorted({layer["blob"] for layer in first["layers"]})
    missing = set(data.draw(st.lists(st.sampled_from(blobs), unique=True)))
    new = _s3_form(_json(second))
    merged = _merge(_json(first), new, limits=MergeLimits(max_records, max_age), missing=missing)
    out = decode_config(merged.s3_config)
    # Only the new export's own layers and the stored ones still present are referenced.
    assert not (
        {layer.blob for layer in out.layers}
        & (missing - {la.blob for la in decode_config(new).layers})
    )
    assert normalize(merged.s3_config) == encode_config(merged.marshalled.config)
    assert _s3_form(merged.s3_config) == merged.s3_config
    counts = merged.counts
    assert counts.records_after == len(out.records)
    # Over the limit only when nothing but the new export's keys is left to drop.
    brought = {
        r.digest
        for r in decode_config(new).records
        if r.results and not r.digest.startswith("random:")
    }
    kept = {r.digest for r in out.records if r.results}
    if counts.records_after > max_records:
        assert kept <= brought
    # Every key the new export brought a result for still has one.
    assert brought <= kept


# --- hand-built cases ---------------------------------------------------------------------


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


def _layer(n: int, parent: int = -1) -> dict[str, Any]:
    return {
        "blob": dg(1000 + n),
        "parent": parent,
        "annotations": {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "diffID": dg(2000 + n),
            "size": 10 + n,
            "createdAt": "2026-01-01T00:00:00Z",
        },
    }


def _roots(keys_and_days: list[tuple[int, int]], base_layer: int = 0) -> bytes:
    """One root record per key, each with its own layer, created ``day`` days into January."""
    layers, records = [], []
    for i, (key, day) in enumerate(keys_and_days):
        layers.append(_layer(base_layer + i))
        records.append(
            {
                "digest": dg(key),
                "layers": [{"layer": i, "createdAt": f"2026-01-{day:02d}T00:00:00Z"}],
            }
        )
    return _s3_form(_json({"layers": layers, "records": records}))


def test_max_records_drops_the_oldest_stored_results_first() -> None:
    stored = _roots([(1, 1), (2, 5), (3, 3), (4, 9)])
    new = _roots([(10, 2)], base_layer=50)  # older than most, but the new export's own
    merged = _merge(stored, new, limits=MergeLimits(max_records=3))
    digests = {r.digest for r in decode_config(merged.s3_config).records}
    assert digests == {dg(10), dg(4), dg(2)}
    c = merged.counts
    assert (c.records_existing, c.records_new, c.records_merged, c.records_after) == (4, 1, 5, 3)
    assert c.results_over_limit == 2
    assert c.layers_after == 3


def test_max_age_keeps_the_new_exports_results_however_old() -> None:
    stored = _roots([(1, 1), (2, 15)])
    new = _roots([(10, 2)], base_layer=50)
    merged = _merge(stored, new, limits=MergeLimits(max_age=7 * DAY))  # cutoff: Jan 13
    assert {r.digest for r in decode_config(merged.s3_config).records} == {dg(2), dg(10)}
    assert merged.counts.results_expired == 1
    assert merged.counts.records_pruned == 1


def test_results_whose_layers_are_gone_are_dropped_with_records_leading_nowhere() -> None:
    # root A (layer 0) <- B (layer 1 on 0); C is another root; the blob of layer 0 is gone.
    stored = _s3_form(
        _json(
            {
                "layers": [_layer(0), _layer(1, 0), _layer(2)],
                "records": [
                    {
                        "digest": dg(1),
                        "layers": [{"layer": 0, "createdAt": "2026-01-02T00:00:00Z"}],
                    },
                    {
                        "digest": dg(2),
                        "inputs": [[{"link": 0}]],
                        "layers": [{"layer": 1, "createdAt": "2026-01-03T00:00:00Z"}],
                    },
                    {
                        "digest": dg(3),
                        "layers": [{"layer": 2, "createdAt": "2026-01-04T00:00:00Z"}],
                    },
                ],
            }
        )
    )
    new = _roots([(10, 5)], base_layer=50)
    existing = read_stored(stored)
    assert {d.digest for d in stored_blobs(existing, decode_config(new))} == {
        dg(1000),
        dg(1001),
        dg(1002),
    }
    merged = _merge(stored, new, missing={dg(1000)})
    out = decode_config(merged.s3_config)
    assert {r.digest for r in out.records} == {dg(3), dg(10)}
    assert {layer.blob for layer in out.layers} == {dg(1002), dg(1050)}
    assert merged.counts.results_missing == 2  # B's chain has layer 0 under it
    assert merged.counts.records_pruned == 2


def test_nothing_stored_gives_the_new_config_normalised() -> None:
    new = _roots([(10, 5), (11, 6)])
    merged = _merge(None, new)
    assert merged.s3_config == new
    assert merged.counts.records_existing == 0


def test_a_blob_of_the_new_export_is_never_missing() -> None:
    stored = _roots([(1, 1)])
    new = _roots([(10, 5)])  # the same layer 0 blob as the stored record
    merged = _merge(stored, new, missing={dg(1000)})
    assert {r.digest for r in decode_config(merged.s3_config).records} == {dg(1), dg(10)}
    assert merged.counts.results_missing == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"layers":[{"blob":"sha256:00"}]}', "layers[0].blob"),
        (
            b'{"records":[{"digest":"' + dg(1).encode() + b'","inputs":[[{"link":7}]]}]}',
            "invalid record ID",
        ),
        (_json({"layers": [{"blob": dg(5), "parent": -1}], "records": []}), "missing annotations"),
    ],
)
def test_a_stored_config_buildkit_would_refuse_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_stored(data)
