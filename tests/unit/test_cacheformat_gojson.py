"""Go encoding/json rules: string escaping, UTF-8 handling, strict reading."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.cacheformat import FormatError, gojson


def go_quote(text: str) -> str:
    """Go's encodeState.string with HTML escaping, written from its rules one by one."""
    out = ['"']
    short = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b"}
    short["\f"] = "\\f"
    for char in text:
        code = ord(char)
        if char in short:
            out.append(short[char])
        elif code < 0x20 or char in "<>&":
            out.append(f"\\u00{code:02x}")
        elif char in "\u2028\u2029":
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")  # not UTF-8: Go writes the replacement escape
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", '"plain"'),
        ('q"b\\', '"q\\"b\\\\"'),
        ("\n\r\t\b\f", '"\\n\\r\\t\\b\\f"'),
        ("\x00\x01\x1f\x7f", '"\\u0000\\u0001\\u001f\x7f"'),
        ("<a href='x'>&</a>", "\"\\u003ca href='x'\\u003e\\u0026\\u003c/a\\u003e\""),
        ("\u2028x\u2029", '"\\u2028x\\u2029"'),
        ("é€😀\ufffd", '"é€😀\ufffd"'),
        ("\ud800", '"\\ufffd"'),
        ("/", '"/"'),
    ],
)
def test_quote_examples(text: str, expected: str) -> None:
    assert gojson.quote(text) == expected


@settings(max_examples=300)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_quote_follows_go_rules(text: str) -> None:
    assert gojson.quote(text) == go_quote(text)
    # A whole document is finished the same way, whatever the string sits in.
    document = json.dumps({"k": [text]}, ensure_ascii=False, separators=(",", ":"))
    assert gojson.finish(document) == ('{"k":[' + go_quote(text) + "]}").encode("utf-8")


@settings(max_examples=200)
@given(st.text())
def test_any_unicode_survives(text: str) -> None:
    assert gojson.loads(gojson.quote(text).encode("utf-8")) == text
    assert gojson.loads(gojson.dumps({"a": text})) == {"a": text}


def test_dumps_is_compact_and_keeps_key_order() -> None:
    value = {"z": 1, "a": [True, None, "<"], "m": {"y": "x"}}
    assert gojson.dumps(value) == b'{"z":1,"a":[true,null,"\\u003c"],"m":{"y":"x"}}'
    assert gojson.sorted_map({"b": "1", "a": "2", "B": "3"}) == {"B": "3", "a": "2", "b": "1"}


def test_invalid_utf8_becomes_one_replacement_per_byte() -> None:
    # Go's decoder replaces every byte of a bad sequence; Python would merge E2 82.
    assert gojson.loads(b'"a\xe2\x82b"') == "a\ufffd\ufffdb"
    assert gojson.loads(b'"\xed\xa0\x80"') == "\ufffd" * 3
    assert gojson.loads(b'"\xff"') == "\ufffd"


def test_unpaired_surrogate_escapes_become_replacement_characters() -> None:
    assert gojson.loads(b'"\\ud800x"') == "\ufffdx"
    assert gojson.loads(b'"\\udc00"') == "\ufffd"
    assert gojson.loads(b'"\\ud83d\\ude00"') == "\U0001f600"
    assert gojson.loads(b'{"\\ud800": ["\\udfff"]}') == {"\ufffd": ["\ufffd"]}
    assert gojson.loads('"\ud800"') == "\ufffd"  # a str holding one is treated alike


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"{} {}", "unexpected data after the JSON value"),
        (b"{}x", "unexpected data after the JSON value"),
        (b"[1,]", "not JSON"),
        (b"NaN", "not JSON"),
        (b"[-Infinity]", "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # Go refuses a byte order mark
        (b'"\x01"', "not JSON"),  # raw control character in a string
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b"1" * 5000, "not JSON"),
    ],
)
def test_loads_refuses(data: bytes, fragment: str) -> None:
    with pytest.raises(FormatError) as caught:
        gojson.loads(data)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_loads_accepts_surrounding_whitespace() -> None:
    assert gojson.loads(b" \t\r\n{}\n ") == {}


def test_fold_keys_matches_go() -> None:
    fields = gojson.Fields("layers", "createdAt")
    obj: dict[str, object] = {"LAYERS": 1, "createdat": 2, "other": 3}
    assert gojson.fold_keys(obj, fields) == {"layers": 1, "createdAt": 2}
    # Go's simple folding: long s and the Kelvin sign match their ASCII letters.
    assert gojson.fold_keys({"layer\u017f": 1}, fields) == {"layers": 1}
    assert gojson.fold_keys({"\u212aey": 1}, gojson.Fields("key")) == {"key": 1}
    assert gojson.fold_keys({"layerß": 1}, fields) == {}
