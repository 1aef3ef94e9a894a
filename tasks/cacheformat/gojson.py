"""JSON exactly as Go's ``encoding/json`` reads and writes it.

Python's ``json`` module is the engine (it is C code and fast); this module closes the gaps:

Writing. With ``ensure_ascii=False`` and no whitespace Python already matches Go for numbers,
``"``, ``\\``, the short escapes ``\\b \\f \\n \\r \\t`` and ``\\u00xx`` (lower-case) for other
control characters. Go additionally escapes ``<``, ``>``, ``&`` (``\\u003c`` ...) and U+2028,
U+2029, and writes ``\\ufffd`` for bytes that are not UTF-8 (in a Python string: lone
surrogates). None of those characters can appear in JSON outside a string, so they are
replaced in the finished document in one pass.

Reading. Go reads only UTF-8 and replaces each invalid byte with U+FFFD, turns unpaired
``\\uD800``-style escapes into U+FFFD, refuses ``NaN``/``Infinity`` and trailing data, and
matches object keys to struct fields case-insensitively. :func:`loads` and :func:`fold_keys`
do the same.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from typing import Final

from tasks.cacheformat.errors import FormatError

_GO_ONLY: Final = re.compile("[<>&\u2028\u2029\ud800-\udfff]")
_GO_ESCAPES: Final = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_ERROR_HANDLER: Final = "cacheship.go-utf8"

_encode_string = json.encoder.encode_basestring


def _go_escape(match: re.Match[str]) -> str:
    # Anything not in the table is a lone surrogate: Go writes invalid UTF-8 as \ufffd.
    return _GO_ESCAPES.get(match.group(), "\\ufffd")


def finish(document: str) -> bytes:
    """Apply Go's extra escapes to a document written by Python's JSON rules, as UTF-8."""
    if _GO_ONLY.search(document) is not None:
        document = _GO_ONLY.sub(_go_escape, document)
    return document.encode("utf-8")


def quote(text: str) -> str:
    """One JSON string literal exactly as Go writes it (HTML-safe escaping included)."""
    quoted: str = _encode_string(text)
    if _GO_ONLY.search(quoted) is not None:
        quoted = _GO_ONLY.sub(_go_escape, quoted)
    return quoted


def quote_raw(text: str) -> str:
    """A JSON string literal by Python's rules; the caller passes the document to finish()."""
    result: str = _encode_string(text)
    return result


def dumps(value: object) -> bytes:
    """Encode plain JSON values (dicts keep their key order) exactly as Go would."""
    return finish(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))


def sorted_map(mapping: Mapping[str, str]) -> dict[str, str]:
    """Go writes map keys sorted (byte order, which is code point order for UTF-8)."""
    return {key: mapping[key] for key in sorted(mapping)}


# --- reading -----------------------------------------------------------------------------


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    # Go's decoder replaces every byte of an invalid sequence with its own U+FFFD; Python
    # reports a maximal invalid subpart at a time, so one replacement per byte of it.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error(_ERROR_HANDLER, _replace_each_byte)


def _refuse_constant(name: str) -> object:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def loads(data: bytes | bytearray | memoryview | str) -> object:
    """Parse one JSON document as Go would: strict, UTF-8, nothing after the value.

    Raises FormatError with a one-line reason.
    """
    if isinstance(data, str):
        text = data
        if _SURROGATE.search(text) is not None:
            text = _SURROGATE.sub("\ufffd", text)
    else:
        text = bytes(data).decode("utf-8", _ERROR_HANDLER)
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            raise FormatError(
                f"unexpected data after the JSON value (line {error.lineno} column {error.colno})"
            ) from None
        raise FormatError(f"not JSON: {error}") from None
    except RecursionError:
        raise FormatError("not JSON: nested too deeply") from None
    except ValueError as error:  # refused constants, integers too long to convert
        raise FormatError(f"not JSON: {error}") from None
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None:
        value = _scrub_surrogates(value)
    return value


def _clean(text: str) -> str:
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def _scrub_surrogates(value: object) -> object:
    """Replace unpaired surrogates (from ``\\uD800``-style escapes) with U+FFFD, as Go does."""
    if isinstance(value, str):
        return _clean(value)
    if not isinstance(value, dict | list):
        return value
    root: list[object] = [value]
    stack: list[dict[str, object] | list[object]] = [value]
    while stack:
        container = stack.pop()
        if isinstance(container, list):
            for index, item in enumerate(container):
                if isinstance(item, str):
                    container[index] = _clean(item)
                elif isinstance(item, dict | list):
                    stack.append(item)
        else:
            items = list(container.items())
            container.clear()
            for key, item in items:
                if isinstance(item, str):
                    item = _clean(item)
                elif isinstance(item, dict | list):
                    stack.append(item)
                container[_clean(key)] = item
    return root[0]


_FOLD: Final = str.maketrans({"\u017f": "s", "\u212a": "k"})


class Fields:
    """The JSON field names of one Go struct, for :func:`fold_keys`."""

    __slots__ = ("exact", "folded")

    def __init__(self, *names: str) -> None:
        self.exact = frozenset(names)
        self.folded = {name.lower(): name for name in names}


def fold_keys(obj: dict[str, object], fields: Fields) -> dict[str, object]:
    """Map the keys of a JSON object onto struct fields the way Go's decoder does.

    Go matches a key to a field by exact name or, failing that, case-insensitively (with
    Unicode simple folding, so ``\u017f`` matches ``s`` and the Kelvin sign ``k``); unknown
    keys are ignored and a later key overwrites an earlier one. The result is keyed by the
    exact field names.
    """
    if obj.keys() <= fields.exact:
        return obj
    folded: dict[str, object] = {}
    for key, value in obj.items():
        name = key if key in fields.exact else fields.folded.get(key.translate(_FOLD).lower())
        if name is not None:
            folded[name] = value
    return folded


def kind(value: object) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def expect_list(value: object, where: str) -> list[object]:
    """A JSON array (``null`` reads as empty, as Go reads it into a nil slice)."""
    if value is None:
        return []
    if type(value) is list:
        return value
    raise FormatError(f"expected an array, got {kind(value)}", where)


def expect_object(value: object, where: str) -> dict[str, object]:
    """A JSON object (``null`` reads as empty, as Go leaves the struct zero)."""
    if value is None:
        return {}
    if type(value) is dict:
        return value
    raise FormatError(f"expected an object, got {kind(value)}", where)


def expect_str(value: object, where: str) -> str:
    """A JSON string (``null`` reads as empty)."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    raise FormatError(f"expected a string, got {kind(value)}", where)


_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


def expect_int(value: object, where: str) -> int:
    """A JSON integer that fits Go's 64-bit int (``null`` reads as 0)."""
    if type(value) is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
        raise FormatError(f"integer out of range: {value}", where)
    if value is None:
        return 0
    if type(value) is float:
        raise FormatError(f"expected an integer, got {value!r}", where)
    raise FormatError(f"expected an integer, got {kind(value)}", where)


def expect_str_map(value: object, where: str) -> dict[str, str]:
    """A JSON object of strings (Go's ``map[string]string``)."""
    obj = expect_object(value, where)
    result: dict[str, str] = {}
    for key, item in obj.items():
        if type(item) is str:
            result[key] = item
        elif item is None:
            result[key] = ""
        else:
            raise FormatError(f"expected a string, got {kind(item)}", f"{where}[{key!r}]")
    return result
