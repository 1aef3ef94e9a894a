"""Writing a cache graph as BuildKit's normalised config (``CacheChains.Marshal``).

The config's digest is the cache's identity, so the walk, the layer sharing and the sort
follow BuildKit step by step:

1. From every leaf, depth first through the input links, a node is written after the nodes
   it links to; a link back to a node still being written (a cycle) is skipped.
2. A node keeps one result, its newest; the result's layers are written root first and a
   layer entry is shared when the same blob sits on the same parent chain.
3. Layers are sorted by blob, then by parent index as it was before sorting; records by
   digest, then input shape, selectors and linked digests; indexes are renumbered and the
   links of a slot sorted by record index.

BuildKit keeps leaves, nodes and each slot's links in Go maps and writes them in iteration
order, which Go randomises; for most graphs the sort makes that invisible, but not for a
slot with several links to one record or for records merged from duplicates. The canonical
output is the one where every such map is iterated in insertion order, as a Python dict
iterates: roots in the order they were created, children and links in the order they were
added. Nothing is sorted that BuildKit does not sort, and its sorts are reproduced with their
tie rules (:mod:`tasks.cacheformat.gosort`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.cacheformat.config import (
    CacheConfig,
    CacheInput,
    CacheLayer,
    CacheRecord,
    CacheResult,
    LayerAnnotations,
    decode_config,
    descriptors_from_annotations,
    encode_config,
)
from tasks.cacheformat.descriptor import (
    ANNOTATION_CREATED_AT,
    ANNOTATION_UNCOMPRESSED,
    MEDIA_TYPE_CACHE_CONFIG,
    Descriptor,
)
from tasks.cacheformat.digests import check_digest, sha256_digest
from tasks.cacheformat.errors import EmptyCacheError, FormatError
from tasks.cacheformat.gcpause import paused_gc
from tasks.cacheformat.gotime import ZERO_TIME, GoTime
from tasks.cacheformat.graph import CacheGraph, CacheNode, parse_graph
from tasks.cacheformat.mediatypes import layer_media_type


@dataclass
class Marshalled:
    """A normalised config and the descriptors of the layers it references.

    ``layers`` holds one descriptor per distinct blob, in config layer order, with OCI
    media types and the annotations the graph carried.
    """

    config: CacheConfig
    layers: list[Descriptor]

    def descriptors(self) -> dict[str, Descriptor]:
        """Layer descriptors by blob digest."""
        return {descriptor.digest: descriptor for descriptor in self.layers}


# A link to follow: (slot, selector, linked node).
_Link = tuple[int, str, CacheNode]
# A link written: (selector, record index before sorting).
_Written = tuple[str, int]


def _links(node: CacheNode) -> list[_Link]:
    """A node's links slot by slot, each slot's in the order they were added."""
    return [
        (slot, selector, parent)
        for slot, links in enumerate(node._parents)
        for parent, selector in links
    ]


class _Writer:
    """Records and layers in the order BuildKit appends them, before the sort."""

    def __init__(
        self, prefixes: dict[int, tuple[tuple[Descriptor, ...], tuple[Descriptor, ...]]]
    ) -> None:
        self._prefixes = prefixes
        self.record_of: dict[CacheNode, int] = {}
        self.digests: list[str] = []
        self.slots: list[list[list[_Written]]] = []
        self.results: list[tuple[int, GoTime] | None] = []
        self.layers: list[tuple[str, int]] = []  # (blob, parent index before sorting)
        self.layer_of: dict[tuple[str, int], int] = {}
        self.descriptors: dict[str, Descriptor] = {}
        self._converted: dict[int, Descriptor] = {}
        # id(chain) -> (chain, top layer index or -1); the chain is kept so its id stays
        # unique
        self._chain_top: dict[int, tuple[tuple[Descriptor, ...], int]] = {}

    def write(self, start: CacheNode) -> None:
        """Write ``start`` after everything it links to (iteratively: graphs can be deep)."""
        if start in self.record_of:
            return
        record_of = self.record_of
        record_of[start] = -1
        # frame: node, its links, slots written so far, position in its links
        stack: list[tuple[CacheNode, list[_Link], list[list[_Written]], list[int]]] = [
            (start, _links(start), [[] for _ in start._parents], [0])
        ]
        while stack:
            node, links, slots, position = stack[-1]
            pushed = False
            while position[0] < len(links):
                slot, selector, target = links[position[0]]
                index = record_of.get(target)
                if index is None:
                    record_of[target] = -1
                    stack.append((target, _links(target), [[] for _ in target._parents], [0]))
                    pushed = True
                    break
                position[0] += 1
                if index != -1:  # -1: still being written, a cycle; BuildKit skips it
                    slots[slot].append((selector, index))
            if pushed:
                continue
            stack.pop()
            best = node.best_result()
            result = None
            if best is not None:
                layer = self._chain(best.chain)
                if layer is not None:
                    result = (layer, best.created_at)
            record_of[node] = len(self.digests)
            self.digests.append(node.digest)
            self.slots.append(slots)
            self.results.append(result)

    def _chain(self, chain: tuple[Descriptor, ...]) -> int | None:
        """Add a result's layers (root first); return the index of its top layer.

        Chains are written once each (results share them), and a chain whose parent chain
        is already written costs one step when the graph knows its prefix.
        """
        pending = []
        current = chain
        while True:
            known = self._chain_top.get(id(current))
            if known is not None and known[0] is current:
                top = known[1]
                break
            prefix = self._prefixes.get(id(current))
            if prefix is None or prefix[0] is not current:
                top = -1
                for descriptor in current:
                    top = self._layer(descriptor, top)
                self._chain_top[id(current)] = (current, top)
                break
            pending.append(current)
            current = prefix[1]
        while pending:
            current = pending.pop()
            top = self._layer(current[-1], top)
            self._chain_top[id(current)] = (current, top)
        return None if top == -1 else top

    def _layer(self, descriptor: Descriptor, parent: int) -> int:
        """The index of ``descriptor``'s blob on the layer at ``parent``, added if new."""
        converted = self._converted.get(id(descriptor))
        if converted is None:
            converted = descriptor.with_media_type(
                layer_media_type(descriptor.media_type, oci=True)
            )
            self._converted[id(descriptor)] = converted
        self.descriptors[descriptor.digest] = converted
        key = (descriptor.digest, parent)
        index = self.layer_of.get(key)
        if index is None:
            index = self.layer_of[key] = len(self.layers)
            self.layers.append(key)
        return index

    def _record_key(self, record: int) -> tuple[object, ...]:
        """BuildKit's record order: digest, number of slots, then slot by slot the slot's
        length and each link's selector and linked digest."""
        digests = self.digests
        key: list[object] = [digests[record], len(self.slots[record])]
        for links in self.slots[record]:
            # Links as written (not yet sorted): BuildKit compares them before their sort.
            key.append(len(links))
            for selector, index in links:
                key.append(selector)
                key.append(digests[index])
        return tuple(key)

    def config(self) -> CacheConfig:
        """Sort and renumber as BuildKit's ``sortConfig`` does."""
        layer_order = sorted(range(len(self.layers)), key=self.layers.__getitem__)
        new_layer = [0] * len(layer_order)
        for position, old in enumerate(layer_order):
            new_layer[old] = position
        # tuple.__new__ builds the named tuples without their Python-level __new__: there
        # is one per layer, record, link and result of a large cache.
        make = tuple.__new__
        layers = []
        for old in layer_order:
            blob, parent = self.layers[old]
            layers.append(make(CacheLayer, (blob, -1 if parent == -1 else new_layer[parent], None)))

        digests = self.digests
        # Sorting by digest alone gives the final order except among records that share
        # a digest; only those need the full key (sorts are stable, and the full key
        # starts with the digest).
        record_order = sorted(range(len(digests)), key=digests.__getitem__)
        start = 0
        while start < len(record_order):
            end = start + 1
            digest = digests[record_order[start]]
            while end < len(record_order) and digests[record_order[end]] == digest:
                end += 1
            if end - start > 1:
                record_order[start:end] = sorted(record_order[start:end], key=self._record_key)
            start = end
        new_record = [0] * len(record_order)
        for position, old in enumerate(record_order):
            new_record[old] = position

        records = []
        all_slots = self.slots
        all_results = self.results
        for old in record_order:
            inputs: list[tuple[CacheInput, ...]] = []
            for links in all_slots[old]:
                if len(links) == 1:
                    selector, index = links[0]
                    inputs.append((make(CacheInput, (selector, new_record[index])),))
                    continue
                # By record index only; equal indexes keep the order they were written in.
                renumbered = sorted(
                    ((sel, new_record[index]) for sel, index in links), key=lambda link: link[1]
                )
                inputs.append(tuple(make(CacheInput, link) for link in renumbered))
            result = all_results[old]
            results = (
                () if result is None else (make(CacheResult, (new_layer[result[0]], result[1])),)
            )
            records.append(make(CacheRecord, (digests[old], tuple(inputs), results, ())))
        return CacheConfig(tuple(layers), tuple(records))


def marshal(graph: CacheGraph, *, allow_empty: bool = False) -> Marshalled:
    """The normalised config of ``graph`` and its layer descriptors.

    Raises EmptyCacheError when no layer is referenced (BuildKit skips such an export);
    ``allow_empty`` returns the layer-less config instead, as BuildKit's ``Marshal`` does.
    """
    with paused_gc():
        writer = _Writer(graph._prefixes)
        for leaf in graph.leaves():
            writer.write(leaf)
        if not writer.layers and not allow_empty:
            raise EmptyCacheError()
        config = writer.config()
    layers: list[Descriptor] = []
    seen: set[str] = set()
    for layer in config.layers:
        if layer.blob not in seen:
            seen.add(layer.blob)
            layers.append(writer.descriptors[layer.blob])
    return Marshalled(config, layers)


def normalize(data: bytes | str) -> bytes:
    """Read a config as BuildKit's S3 importer would, and write it as BuildKit's exporter.

    Layer descriptors come from the layers' S3 annotations; the result has no annotations
    (it is the config blob of the content-store layout). A cache without layers gives the
    config BuildKit's marshaller writes for it (records only), not an error: exporting it
    is what BuildKit skips.
    """
    with paused_gc():
        cfg = decode_config(data)
        graph = parse_graph(cfg, descriptors_from_annotations(cfg))
        del cfg  # a large config is freed before the marshalled copy is built
        config = marshal(graph, allow_empty=True).config
        graph.release()  # freed now, not by the cycle collector once it runs again
        data = encode_config(config)
        del config  # freed before the collector is back on, so it never walks it
    return data


def s3_config_bytes(m: Marshalled) -> bytes:
    """The config as BuildKit's S3 exporter writes it to ``manifests/<name>``.

    Each layer gets the annotations its importer needs: media type, diffID (required),
    size, and creation time in UTC (zero when unknown).
    """
    by_blob = m.descriptors()
    layers = []
    for index, layer in enumerate(m.config.layers):
        where = f"layers[{index}]"
        descriptor = by_blob.get(layer.blob)
        if descriptor is None:
            raise FormatError(f"missing blob {layer.blob}", where)
        diff_id = descriptor.annotations.get(ANNOTATION_UNCOMPRESSED)
        if diff_id is None:
            raise FormatError("invalid descriptor without uncompressed annotation", where)
        check_digest(diff_id, f"{where}: {ANNOTATION_UNCOMPRESSED}")
        created_at = ZERO_TIME
        text = descriptor.annotations.get(ANNOTATION_CREATED_AT)
        if text is not None:
            try:
                created_at = GoTime.parse(text).utc()
            except ValueError as error:
                raise FormatError(str(error), f"{where}: {ANNOTATION_CREATED_AT}") from None
        annotations = LayerAnnotations(descriptor.media_type, diff_id, descriptor.size, created_at)
        layers.append(layer._replace(annotations=annotations))
    return encode_config(m.config._replace(layers=tuple(layers)))


def config_descriptor(config_bytes: bytes) -> Descriptor:
    """The descriptor of a config blob (media type ``application/vnd.buildkit.cacheconfig.v0``)."""
    return Descriptor(MEDIA_TYPE_CACHE_CONFIG, sha256_digest(config_bytes), len(config_bytes))
