"""The cache graph: BuildKit's add/merge/dedup semantics and ParseConfig's errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tasks.cacheformat import (
    CacheGraph,
    CacheNode,
    Descriptor,
    FormatError,
    GoTime,
    decode_config,
    descriptors_from_annotations,
    encode_config,
    marshal,
    parse_graph,
)


def dg(n: int) -> str:
    return f"sha256:{n:064x}"


def layer(n: int) -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", dg(1000 + n), n)


def t(second: int, offset: str = "Z") -> GoTime:
    return GoTime.parse(f"2024-01-01T00:00:{second:02d}{offset}")


X, Y, D, E = dg(1), dg(2), dg(3), dg(4)


def records_of(graph: CacheGraph) -> list[dict[str, Any]]:
    config = marshal(graph, allow_empty=True).config
    return json.loads(encode_config(config)).get("records", [])  # type: ignore[no-any-return]


def test_roots_are_keyed_by_digest_and_gather_results() -> None:
    g = CacheGraph()
    a = g.add_record(X, results=[(t(1), [layer(1)])])
    b = g.add_record(X, results=[(t(2), [layer(2)])])
    assert a is b is g.roots[X]
    assert a is not None
    assert [r.created_at for r in a.results] == [t(1), t(2)]


def test_result_is_present_when_time_and_length_match() -> None:
    g = CacheGraph()
    node = g.add_record(X, results=[(t(1), [layer(1), layer(2)])])
    assert node is not None
    # BuildKit compares the creation instant and the number of layers, not the digests.
    g.add_record(X, results=[(t(1), [layer(7), layer(8)])])
    assert len(node.results) == 1
    same_instant = GoTime.parse("2024-01-01T01:00:01+01:00")
    g.add_record(X, results=[(same_instant, [layer(9), layer(9)])])
    assert len(node.results) == 1
    g.add_record(X, results=[(t(1), [layer(1)])])
    g.add_record(X, results=[(t(2), [layer(1), layer(2)])])
    assert len(node.results) == 3


def test_a_new_node_keeps_its_results_as_given() -> None:
    g = CacheGraph()
    x = g.add_record(X)
    assert x is not None
    node = g.add_record(D, [[("", x)]], [(t(1), [layer(1)]), (t(1), [layer(2)])])
    assert node is not None
    assert len(node.results) == 2


def test_same_digest_through_same_links_is_the_same_node() -> None:
    g = CacheGraph()
    x, y = g.add_record(X), g.add_record(Y)
    assert x is not None and y is not None
    a = g.add_record(D, [[("/src", x)], [("", y)]], [(t(1), [layer(1)])])
    again = g.add_record(D, [[("/src", x)], [("", y)]], [(t(2), [layer(1)])])
    assert again is a
    assert a is not None and len(a.results) == 2
    # One link per slot is enough to match, if the other links are new.
    wider = g.add_record(D, [[("/src", x), ("other", y)], [("", y)]])
    assert wider is a
    assert sorted(sel for sel, _ in a.inputs[0]) == ["/src", "other"]
    # A different selector, slot or digest is another node.
    assert g.add_record(D, [[("/other", x)], [("", y)]]) is not a
    assert g.add_record(D, [[("", y)], [("/src", x)]]) is not a
    assert g.add_record(E, [[("/src", x)], [("", y)]]) is not a
    # Only the new record's slots are compared: fewer slots still match.
    assert g.add_record(D, [[("/src", x)]]) is a


def test_several_matches_are_merged_into_the_oldest() -> None:
    g = CacheGraph()
    x, y = g.add_record(X), g.add_record(Y)
    assert x is not None and y is not None
    a = g.add_record(D, [[("", x)]], [(t(1), [layer(1)])])
    b = g.add_record(D, [[("", y)]], [(t(2), [layer(2)])])
    assert a is not None and b is not None and a is not b
    merged = g.add_record(D, [[("", x), ("", y)]], [(t(3), [layer(3)])])
    assert merged is a
    assert [r.created_at for r in a.results] == [t(1), t(2), t(3)]
    assert [node for _, node in a.inputs[0]] == [x, y]
    # Like BuildKit, the merged-away node keeps its own link and stays a leaf.
    assert b.inputs == [[("", y)]]
    records = records_of(g)
    assert [r["digest"] for r in records] == [X, Y, D, D]
    assert records[2]["inputs"] == [[{"link": 1}]]
    assert records[3]["inputs"] == [[{"link": 0}, {"link": 1}]]
    assert records[3]["layers"][0]["createdAt"] == "2024-01-01T00:00:03Z"


def test_merge_moves_children_to_the_survivor() -> None:
    g = CacheGraph()
    x, y = g.add_record(X), g.add_record(Y)
    assert x is not None and y is not None
    a = g.add_record(D, [[("", x)]])
    b = g.add_record(D, [[("", y)]])
    assert a is not None and b is not None
    child = g.add_record(E, [[("", b)]], [(t(5), [layer(5)])])
    assert child is not None
    assert g.add_record(D, [[("", x), ("", y)]]) is a
    assert child.inputs == [[("", a)]]
    assert (("", 0, child) in a.children) and (("", 0, child) in b.children)
    # The merged-away node now has a child and no one links to it: it is not written.
    assert [r["digest"] for r in records_of(g)] == [X, Y, D, E]


def test_links_from_descendants_are_dropped() -> None:
    g = CacheGraph()
    x = g.add_record(X)
    assert x is not None
    a = g.add_record(D, [[("", x)]])
    assert a is not None
    below = g.add_record(E, [[("", a)]])
    assert below is not None
    # Matches `a` through x; the link from `below` (a's child) would make a loop.
    assert g.add_record(D, [[("", x), ("", below)]]) is a
    assert a.inputs == [[("", x)]]
    # A link from the node itself is dropped too.
    assert g.add_record(D, [[("", x), ("self", a)]]) is a
    assert a.inputs == [[("", x)]]
    assert [r["digest"] for r in records_of(g)] == [X, D, E]


def test_a_loop_made_by_a_merge_is_skipped_when_written() -> None:
    g = CacheGraph()
    x, y = g.add_record(X), g.add_record(Y)
    assert x is not None and y is not None
    a = g.add_record(D, [[("", x)]])
    b = g.add_record(D, [[("", y)]])
    assert a is not None and b is not None
    assert g.add_record(D, [[("", x), ("", b)]]) is a  # a is now also b's child
    # Merging a and b copies b's child a onto a: a links to itself.
    assert g.add_record(D, [[("", x), ("", y)]]) is a
    assert ("", a) in a.inputs[0]
    g.add_record(E, [[("", a)]], [(t(1), [layer(1)])])
    records = records_of(g)
    assert [r["digest"] for r in records] == [X, Y, D, E]
    assert records[2]["inputs"] == [[{"link": 0}, {"link": 1}]]


def test_graph_without_leaves_writes_nothing() -> None:
    g = CacheGraph()
    x, y = g.add_record(X), g.add_record(Y)
    assert x is not None and y is not None
    a = g.add_record(D, [[("", x)]], [(t(1), [layer(1)])])
    b = g.add_record(D, [[("", y)]])
    assert a is not None and b is not None
    g.add_record(D, [[("", x), ("", b)]])
    g.add_record(D, [[("", x), ("", y)]])
    assert g.leaves() == []
    assert records_of(g) == []


def test_random_digests_are_ignored() -> None:
    g = CacheGraph()
    assert g.add_record("random:abc", results=[(t(1), [layer(1)])]) is None
    assert g.nodes() == []


def test_builder_refuses_bad_arguments() -> None:
    g, other = CacheGraph(), CacheGraph()
    foreign = other.add_record(X)
    assert foreign is not None
    with pytest.raises(FormatError, match=r"^inputs\[0\]: empty dependency"):
        g.add_record(D, [[]])
    with pytest.raises(FormatError, match="not a node of the same cache graph"):
        g.add_record(D, [[("", foreign)]])
    with pytest.raises(FormatError, match="'sha1' is not supported"):
        g.add_record("sha1:abc")
    with pytest.raises(FormatError, match=r"^results\[0\]: expected a GoTime"):
        g.add_record(X, results=[("2024-01-01T00:00:00Z", [layer(1)])])  # type: ignore[list-item]
    with pytest.raises(FormatError, match=r"^results\[0\]: expected a Descriptor"):
        g.add_record(X, results=[(t(1), [dg(5)])])  # type: ignore[list-item]


def test_deep_graphs_need_no_recursion() -> None:
    g = CacheGraph()
    node: CacheNode | None = g.add_record(dg(1), results=[(t(0), [layer(0)])])
    for n in range(2, 5002):
        assert node is not None
        node = g.add_record(dg(n), [[("", node)]], [(t(n % 60), [layer(n)])])
    records = records_of(g)
    assert len(records) == 5001


# --- ParseConfig --------------------------------------------------------------------------


def parse(value: dict[str, Any]) -> CacheGraph:
    cfg = decode_config(json.dumps(value).encode())
    return parse_graph(cfg, descriptors_from_annotations(cfg))


def ann(n: int) -> dict[str, Any]:
    return {"mediaType": "m", "diffID": dg(900 + n), "size": n, "createdAt": "0001-01-01T00:00:00Z"}


def layers(*parents: int) -> list[dict[str, Any]]:
    return [
        {"blob": dg(100 + i), "parent": p, "annotations": ann(i)} for i, p in enumerate(parents)
    ]


def rec(n: int, *, inputs: Any = None, layer_index: int | None = None, **extra: Any) -> Any:
    value: dict[str, Any] = {"digest": dg(n), **extra}
    if inputs is not None:
        value["inputs"] = inputs
    if layer_index is not None:
        value["layers"] = [{"layer": layer_index, "createdAt": "2024-01-01T00:00:00Z"}]
    return value


def parse_error(value: dict[str, Any]) -> str:
    with pytest.raises(FormatError) as caught:
        parse(value)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"records": [rec(1), rec(2, inputs=[[{"link": 0}], [{"link": 5}]])]},
            "records[1].inputs[1][0].link: invalid record ID: 5",
        ),
        (
            {"records": [rec(1, inputs=[[{"link": -1}]])]},
            "records[0].inputs[0][0].link: invalid record ID: -1",
        ),
        (
            {"records": [rec(1, inputs=[[{"link": 1}]]), rec(2, inputs=[[{"link": 0}]])]},
            "records[1].inputs[0][0].link: invalid looping record",
        ),
        (
            {"records": [rec(1, inputs=[[{"link": 0}]])]},
            "records[0].inputs[0][0].link: invalid looping record",
        ),
        (
            {"records": [rec(1), rec(2, inputs=[[{"link": 0}], []])]},
            "records[1].inputs[1]: invalid empty input for record 1",
        ),
        (
            {"layers": layers(-1), "records": [rec(1, layer_index=3)]},
            "records[0].layers[0].layer: invalid layer index 3",
        ),
        (
            {"layers": layers(-1, 7), "records": [rec(1, layer_index=1)]},
            "records[0].layers[0].layer: invalid layer index 7 (layers[1].parent)",
        ),
        (
            {"layers": layers(-1), "records": [rec(1, chains=[{"layers": [0, -2]}])]},
            "records[0].chains[0].layers[1]: invalid layer index -2",
        ),
        (
            {"layers": layers(1, 0), "records": [rec(1, layer_index=0)]},
            "records[0].layers[0].layer: invalid looping layer",
        ),
        (
            {"layers": layers(0), "records": [rec(1, layer_index=0)]},
            "records[0].layers[0].layer: invalid looping layer (layers[0].parent = 0)",
        ),
        (
            {"records": [{"digest": "random:x"}, rec(2, inputs=[[{"link": 0}]])]},
            "records[1].inputs[0][0].link: invalid looping record (record 0 has a random: digest)",
        ),
        (
            {"records": [rec(2, inputs=[[{"link": 1}]]), {"digest": "random:x"}]},
            "records[0].inputs[0][0].link: failed to add record 0: linked record 1 has a random:",
        ),
    ],
)
def test_parse_errors(value: dict[str, Any], expected: str) -> None:
    assert expected in parse_error(value)


def test_parse_reports_the_error_buildkit_meets_first() -> None:
    # Record 0 is read (and its bad result met) before record 1's bad link.
    value = {
        "layers": layers(-1),
        "records": [rec(1, layer_index=4), rec(2, inputs=[[{"link": 9}]])],
    }
    assert "records[0].layers[0].layer: invalid layer index 4" in parse_error(value)
    # Record 0 reads record 1 first (a link), so record 1's bad result comes first.
    value = {
        "layers": layers(-1),
        "records": [rec(1, inputs=[[{"link": 1}], [{"link": 9}]]), rec(2, layer_index=4)],
    }
    assert "records[1].layers[0].layer: invalid layer index 4" in parse_error(value)
    # ... but a link error met before reading record 1 wins.
    value["records"][0]["inputs"] = [[{"link": 9}], [{"link": 1}]]
    assert "records[0].inputs[0][0].link: invalid record ID: 9" in parse_error(value)


def test_results_without_descriptors_are_dropped_without_checks() -> None:
    value: dict[str, Any] = {
        "layers": [*layers(-1, 0), {"blob": dg(500), "parent": 99}],
        "records": [
            rec(1, layer_index=2),  # blob has no descriptor: parent 99 never looked at
            rec(2, chains=[{"layers": [1, 2, 77], "createdAt": "2024-01-01T00:00:00Z"}]),
            rec(3, layer_index=1),
        ],
    }
    cfg = decode_config(json.dumps(value).encode())
    descriptors = descriptors_from_annotations(
        decode_config(json.dumps({"layers": value["layers"][:2]}).encode())
    )
    graph = parse_graph(cfg, descriptors)
    chains = {node.digest: [len(r.chain) for r in node.results] for node in graph.nodes()}
    assert chains == {dg(1): [], dg(2): [], dg(3): [2]}


def test_chains_become_results() -> None:
    value = {
        "layers": layers(-1, -1),
        "records": [rec(1, chains=[{"layers": [1, 0, 0], "createdAt": "2024-01-01T00:00:09Z"}])],
    }
    (node,) = parse(value).nodes()
    assert [d.digest for d in node.results[0].chain] == [dg(101), dg(100), dg(100)]


def test_parse_links_records_in_any_order() -> None:
    value = {
        "layers": layers(-1),
        "records": [
            rec(3, inputs=[[{"link": 1, "selector": "s"}]], layer_index=0),
            rec(2, inputs=[[{"link": 2}]]),
            rec(1),
        ],
    }
    graph = parse(value)
    (root,) = graph.roots.values()
    (middle,) = [child for _, _, child in root.children]
    (top,) = [child for _, _, child in middle.children]
    assert (root.digest, middle.digest, top.digest) == (dg(1), dg(2), dg(3))
    assert top.inputs == [[("s", middle)]]


def test_parse_handles_deep_configs() -> None:
    count = 20_000
    records = [rec(n + 1, inputs=[[{"link": n + 1}]]) for n in range(count - 1)]
    records.append(rec(count, layer_index=0))
    graph = parse({"layers": layers(-1), "records": records})
    assert len(graph.nodes()) == count
