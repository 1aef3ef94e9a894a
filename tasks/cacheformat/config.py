"""The cache config v0 (``application/vnd.buildkit.cacheconfig.v0``): model, decoder, encoder.

The model mirrors BuildKit's ``cache/remotecache/v1/types`` one field for one field, as
immutable named tuples (there are hundreds of thousands of them in a large cache, so they
must be cheap):

- :class:`CacheConfig` ``(layers, records)``
- :class:`CacheLayer` ``(blob, parent, annotations)``: ``parent`` is a layer index, ``-1``
  for none. In JSON a missing ``parent`` means ``0``, as in Go.
- :class:`LayerAnnotations` ``(media_type, diff_id, size, created_at)``: S3 layout only.
- :class:`CacheRecord` ``(digest, inputs, results, chains)``: ``inputs`` is a tuple of
  slots, each a tuple of :class:`CacheInput` ``(selector, link)``; ``results`` are
  :class:`CacheResult` ``(layer, created_at)`` (JSON ``layers``) and ``chains`` are
  :class:`ChainedResult` ``(layers, created_at)``.

Decoding validates types and digests and reads what Go's ``encoding/json`` reads (unknown
keys ignored, case-insensitive keys, ``null`` as the zero value). Index checks (links,
layer indexes, loops) belong to the graph parser, which reports them as BuildKit does.
Encoding is byte-exact with Go's ``json.Marshal`` of the same structs.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from tasks.cacheformat import gojson
from tasks.cacheformat.descriptor import (
    ANNOTATION_CREATED_AT,
    ANNOTATION_UNCOMPRESSED,
    Descriptor,
)
from tasks.cacheformat.digests import check_digest, check_record_digest, is_sha256
from tasks.cacheformat.errors import FormatError
from tasks.cacheformat.gcpause import paused_gc
from tasks.cacheformat.gotime import ZERO_TIME, GoTime


class LayerAnnotations(NamedTuple):
    """What the S3 layout stores beside each layer so an importer can rebuild descriptors."""

    media_type: str = ""
    diff_id: str = ""
    size: int = 0
    created_at: GoTime = ZERO_TIME


class CacheLayer(NamedTuple):
    """A layer blob on top of another layer (``parent`` index, ``-1`` for a base layer)."""

    blob: str
    parent: int
    annotations: LayerAnnotations | None = None


class CacheInput(NamedTuple):
    """A link to another record (by index), optionally through a selector."""

    selector: str
    link: int


class CacheResult(NamedTuple):
    """A result: the layer at ``layer`` with all its parents."""

    layer: int
    created_at: GoTime


class ChainedResult(NamedTuple):
    """A result given as an explicit list of layer indexes, root first (no parents followed)."""

    layers: tuple[int, ...]
    created_at: GoTime


class CacheRecord(NamedTuple):
    """One cache key: its digest, its input slots and the results stored under it."""

    digest: str
    inputs: tuple[tuple[CacheInput, ...], ...] = ()
    results: tuple[CacheResult, ...] = ()
    chains: tuple[ChainedResult, ...] = ()


class CacheConfig(NamedTuple):
    """The whole config: layers and the records that point at them, by index."""

    layers: tuple[CacheLayer, ...] = ()
    records: tuple[CacheRecord, ...] = ()


# --- decoding ----------------------------------------------------------------------------

# Builds a named tuple from a tuple of all its fields without its Python-level __new__:
# a large config has hundreds of thousands of them.
_make: Final = tuple.__new__

_CONFIG_FIELDS: Final = gojson.Fields("layers", "records")
_LAYER_FIELDS: Final = gojson.Fields("blob", "parent", "annotations")
_ANNOTATION_FIELDS: Final = gojson.Fields("mediaType", "diffID", "size", "createdAt")
_RECORD_FIELDS: Final = gojson.Fields("layers", "chains", "digest", "inputs")
_RESULT_FIELDS: Final = gojson.Fields("layer", "createdAt")
_CHAIN_FIELDS: Final = gojson.Fields("layers", "createdAt")
_INPUT_FIELDS: Final = gojson.Fields("selector", "link")


def _fields(value: object, fields: gojson.Fields, where: str) -> dict[str, object]:
    if type(value) is dict and value.keys() <= fields.exact:
        return value  # the common case: keys exactly as BuildKit writes them
    return gojson.fold_keys(gojson.expect_object(value, where), fields)


def _time(value: object, where: str) -> GoTime:
    if type(value) is str:
        try:
            return GoTime.parse(value)
        except ValueError as error:
            raise FormatError(str(error), where) from None
    if value is None:
        return ZERO_TIME
    raise FormatError(f"expected an RFC 3339 time string, got {gojson.kind(value)}", where)


# Go's int on the 64-bit platforms BuildKit runs on.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1


def _int(value: object, where: str) -> int:
    if type(value) is int and _INT_MIN <= value <= _INT_MAX:
        return value
    return gojson.expect_int(value, where)


def decode_config(data: bytes | str) -> CacheConfig:
    """Read a cache config as BuildKit reads it; FormatError on anything it would refuse.

    Beyond what Go checks, digests must be sha256 and sizes non-negative. Trailing data
    after the JSON value is refused (as BuildKit's S3 importer does).
    """
    with paused_gc():
        return config_from_json(gojson.loads(data))


def config_from_json(value: object) -> CacheConfig:
    """Build a :class:`CacheConfig` from already-parsed JSON (see :func:`decode_config`)."""
    obj = _fields(value, _CONFIG_FIELDS, "config")
    layers = tuple(
        _layer(item, index)
        for index, item in enumerate(gojson.expect_list(obj.get("layers"), "layers"))
    )
    records = tuple(
        _record(item, index)
        for index, item in enumerate(gojson.expect_list(obj.get("records"), "records"))
    )
    return CacheConfig(layers, records)


def _layer(value: object, index: int) -> CacheLayer:
    where = f"layers[{index}]"
    obj = _fields(value, _LAYER_FIELDS, where)
    blob = obj.get("blob")
    if type(blob) is not str or not is_sha256(blob):
        if blob is None or blob == "":
            raise FormatError("layer has no blob digest", f"{where}.blob")
        blob = check_digest(blob, f"{where}.blob")
    parent = _int(obj.get("parent"), f"{where}.parent")
    annotations = obj.get("annotations")
    return _make(
        CacheLayer,
        (
            blob,
            parent,
            None if annotations is None else _annotations(annotations, f"{where}.annotations"),
        ),
    )


def _annotations(value: object, where: str) -> LayerAnnotations:
    obj = _fields(value, _ANNOTATION_FIELDS, where)
    media_type = gojson.expect_str(obj.get("mediaType"), f"{where}.mediaType")
    diff_id = obj.get("diffID")
    if diff_id is not None and diff_id != "":
        diff_id = check_digest(diff_id, f"{where}.diffID")
    else:
        diff_id = ""
    size = _int(obj.get("size"), f"{where}.size")
    if size < 0:
        raise FormatError(f"size must not be negative, got {size}", f"{where}.size")
    created_at = _time(obj.get("createdAt"), f"{where}.createdAt")
    return _make(LayerAnnotations, (media_type, diff_id, size, created_at))


def _record(value: object, index: int) -> CacheRecord:
    where = f"records[{index}]"
    obj = _fields(value, _RECORD_FIELDS, where)
    digest = obj.get("digest")
    if type(digest) is not str or not is_sha256(digest):
        digest = check_record_digest("" if digest is None else digest, f"{where}.digest")
    inputs = obj.get("inputs")
    slots: tuple[tuple[CacheInput, ...], ...] = ()
    if inputs is not None:
        slots = tuple(
            _slot(slot, where, i)
            for i, slot in enumerate(gojson.expect_list(inputs, f"{where}.inputs"))
        )
    results: tuple[CacheResult, ...] = ()
    layers = obj.get("layers")
    if layers is not None:
        results = tuple(
            _result(item, where, i)
            for i, item in enumerate(gojson.expect_list(layers, f"{where}.layers"))
        )
    chains: tuple[ChainedResult, ...] = ()
    chain_values = obj.get("chains")
    if chain_values is not None:
        chains = tuple(
            _chain(item, f"{where}.chains[{i}]")
            for i, item in enumerate(gojson.expect_list(chain_values, f"{where}.chains"))
        )
    return _make(CacheRecord, (digest, slots, results, chains))


def _slot(value: object, record: str, i: int) -> tuple[CacheInput, ...]:
    if type(value) is not list:
        value = gojson.expect_list(value, f"{record}.inputs[{i}]")
    out = []
    exact = _INPUT_FIELDS.exact
    for j, item in enumerate(value):
        if type(item) is dict and item.keys() <= exact:
            selector = item.get("selector", "")
            link = item.get("link", 0)
            if type(selector) is str and type(link) is int and _INT_MIN <= link <= _INT_MAX:
                out.append(_make(CacheInput, (selector, link)))
                continue
        where = f"{record}.inputs[{i}][{j}]"
        obj = _fields(item, _INPUT_FIELDS, where)
        out.append(
            CacheInput(
                gojson.expect_str(obj.get("selector"), f"{where}.selector"),
                gojson.expect_int(obj.get("link"), f"{where}.link"),
            )
        )
    return tuple(out)


def _result(value: object, record: str, i: int) -> CacheResult:
    if type(value) is dict and value.keys() <= _RESULT_FIELDS.exact:
        layer = value.get("layer", 0)
        created_at = value.get("createdAt")
        if type(layer) is int and _INT_MIN <= layer <= _INT_MAX and type(created_at) is str:
            try:
                return _make(CacheResult, (layer, GoTime.parse(created_at)))
            except ValueError:
                pass  # reported with its location below
    where = f"{record}.layers[{i}]"
    obj = _fields(value, _RESULT_FIELDS, where)
    return CacheResult(
        gojson.expect_int(obj.get("layer"), f"{where}.layer"),
        _time(obj.get("createdAt"), f"{where}.createdAt"),
    )


def _chain(value: object, where: str) -> ChainedResult:
    obj = _fields(value, _CHAIN_FIELDS, where)
    indexes = gojson.expect_list(obj.get("layers"), f"{where}.layers")
    return ChainedResult(
        tuple(gojson.expect_int(item, f"{where}.layers[{i}]") for i, item in enumerate(indexes)),
        _time(obj.get("createdAt"), f"{where}.createdAt"),
    )


# --- encoding ----------------------------------------------------------------------------


def encode_config(cfg: CacheConfig) -> bytes:
    """The config as Go's ``json.Marshal`` writes it (BuildKit's bytes, hence its digest).

    Field order and ``omitempty`` follow the Go structs; an input slot or chain that is
    empty is written ``null`` (Go's nil slice). Raises FormatError for a time Go cannot
    write (year outside 0 to 9999).
    """
    with paused_gc():
        return _encode(cfg)


def _encode(cfg: CacheConfig) -> bytes:
    quote = gojson.quote_raw
    parts: list[str] = ["{"]
    if cfg.layers:
        parts.append('"layers":[')
        first = True
        for layer in cfg.layers:
            fields = []
            if layer.blob:
                fields.append('"blob":' + quote(layer.blob))
            if layer.parent:
                fields.append('"parent":' + str(layer.parent))
            if layer.annotations is not None:
                fields.append('"annotations":' + _encode_annotations(layer.annotations))
            parts.append(("{" if first else ",{") + ",".join(fields) + "}")
            first = False
        parts.append("]")
    if cfg.records:
        parts.append(',"records":[' if cfg.layers else '"records":[')
        first = True
        for record in cfg.records:
            fields = []
            if record.results:
                fields.append(
                    '"layers":['
                    + ",".join(
                        '{"layer":'
                        + str(r.layer)
                        + ',"createdAt":"'
                        + _time_text(r.created_at)
                        + '"}'
                        for r in record.results
                    )
                    + "]"
                )
            if record.chains:
                fields.append(
                    '"chains":['
                    + ",".join(
                        '{"layers":'
                        + ("[" + ",".join(map(str, c.layers)) + "]" if c.layers else "null")
                        + ',"createdAt":"'
                        + _time_text(c.created_at)
                        + '"}'
                        for c in record.chains
                    )
                    + "]"
                )
            if record.digest:
                fields.append('"digest":' + quote(record.digest))
            if record.inputs:
                fields.append('"inputs":[' + ",".join(map(_encode_slot, record.inputs)) + "]")
            parts.append(("{" if first else ",{") + ",".join(fields) + "}")
            first = False
        parts.append("]")
    parts.append("}")
    return gojson.finish("".join(parts))


def _encode_slot(slot: tuple[CacheInput, ...]) -> str:
    if not slot:
        return "null"
    quote = gojson.quote_raw
    return (
        "["
        + ",".join(
            ('{"selector":' + quote(i.selector) + ',"link":' + str(i.link) + "}")
            if i.selector
            else '{"link":' + str(i.link) + "}"
            for i in slot
        )
        + "]"
    )


def _encode_annotations(a: LayerAnnotations) -> str:
    fields = []
    if a.media_type:
        fields.append('"mediaType":' + gojson.quote_raw(a.media_type))
    if a.diff_id:
        fields.append('"diffID":' + gojson.quote_raw(a.diff_id))
    if a.size:
        fields.append('"size":' + str(a.size))
    fields.append('"createdAt":"' + _time_text(a.created_at) + '"')
    return "{" + ",".join(fields) + "}"


def _time_text(value: GoTime) -> str:
    try:
        return value.format()
    except ValueError as error:
        raise FormatError(f"Time.MarshalJSON: {error}") from None


# --- the S3 layout -----------------------------------------------------------------------


def descriptors_from_annotations(cfg: CacheConfig) -> dict[str, Descriptor]:
    """The layer descriptors that BuildKit's S3 importer rebuilds from layer annotations.

    Every layer needs annotations with a diffID (BuildKit refuses the whole cache
    otherwise); when a blob appears twice the last entry wins.
    """
    with paused_gc():
        return _descriptors(cfg)


def _descriptors(cfg: CacheConfig) -> dict[str, Descriptor]:
    out: dict[str, Descriptor] = {}
    for index, layer in enumerate(cfg.layers):
        a = layer.annotations
        if a is None:
            raise FormatError("cache layer with missing annotations", f"layers[{index}]")
        if not a.diff_id:
            raise FormatError(
                "cache layer with missing diffid", f"layers[{index}].annotations.diffID"
            )
        annotations = {ANNOTATION_UNCOMPRESSED: a.diff_id}
        if not a.created_at.is_zero:
            annotations[ANNOTATION_CREATED_AT] = _time_text(a.created_at)
        out[layer.blob] = Descriptor(a.media_type, layer.blob, a.size, annotations)
    return out
