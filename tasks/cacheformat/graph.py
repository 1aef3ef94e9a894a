"""The cache graph: BuildKit's ``CacheChains`` with the same add/merge semantics.

A :class:`CacheGraph` holds :class:`CacheNode` s. A node is a cache key (``digest``) with
input slots that link to other nodes (each link through a ``selector``) and results
(:class:`ExportResult`: a creation time and a layer chain of descriptors, root first).
Nodes without inputs are roots, one per digest.

Build a graph the way BuildKit's solver does, record by record with
:meth:`CacheGraph.add_record`, or read a config with :func:`parse_graph`. Adding a record
that matches an existing node (same digest, reached through the same links in every slot)
returns that node instead of a new one; when several nodes match they are merged. Those
rules, and the quirks that come with them (the merged-away node stays in the graph, a
result counts as present when the creation time and the number of layers match), are
BuildKit's: the marshalled config has to be the bytes BuildKit would write.

Where BuildKit iterates a Go map (random order), this code iterates in insertion order
(roots, children and each slot's links are dicts), which defines the canonical output:
``marshal`` walks the graph in that order and applies only BuildKit's own sorts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from tasks.cacheformat.config import CacheConfig, CacheRecord
from tasks.cacheformat.descriptor import Descriptor
from tasks.cacheformat.digests import RANDOM_PREFIX, check_record_digest
from tasks.cacheformat.errors import FormatError, show
from tasks.cacheformat.gcpause import paused_gc
from tasks.cacheformat.gotime import GoTime


class ExportResult(NamedTuple):
    """A result of a cache key: when it was created and its layers, root first."""

    created_at: GoTime
    chain: tuple[Descriptor, ...]


# A child edge key: (selector, input slot index, digest of the child).
_EdgeKey = tuple[str, int, str]


class CacheNode:
    """One cache key in a :class:`CacheGraph` (BuildKit's ``item``).

    Read-only from outside: ``digest``, ``results``, ``inputs`` and ``children``.
    """

    __slots__ = (
        "_children",
        "_extra_parents",
        "_graph",
        "_parents",
        "_results",
        "_seq",
        "digest",
    )

    def __init__(self, graph: CacheGraph, digest: str, seq: int) -> None:
        self.digest = digest
        self._graph = graph
        self._seq = seq
        # children[(selector, slot, child digest)] = ordered set of child nodes
        # (None until the first child: most nodes of a large cache are leaves.)
        self._children: dict[_EdgeKey, dict[CacheNode, None]] | None = None
        # parents[slot] = ordered set of (parent node, selector)
        self._parents: list[dict[tuple[CacheNode, str], None]] = []
        # Nodes that list this one as a child without a link back in _parents (a merge
        # copies children without touching every back link, exactly like BuildKit).
        self._extra_parents: dict[CacheNode, None] | None = None
        self._results: list[ExportResult] = []

    @property
    def results(self) -> tuple[ExportResult, ...]:
        """Results in the order they were added."""
        return tuple(self._results)

    @property
    def inputs(self) -> list[list[tuple[str, CacheNode]]]:
        """Input slots, each a list of ``(selector, linked node)``."""
        return [[(selector, node) for node, selector in slot] for slot in self._parents]

    @property
    def children(self) -> list[tuple[str, int, CacheNode]]:
        """Nodes that link to this one: ``(selector, their slot index, node)``."""
        return [
            (selector, slot, child)
            for (selector, slot, _digest), nodes in (self._children or {}).items()
            for child in nodes
        ]

    def best_result(self) -> ExportResult | None:
        """The newest result (the first of equals), the only one a config keeps."""
        best = None
        for result in self._results:
            if best is None or result.created_at > best.created_at:
                best = result
        return best

    def _add_result(self, result: ExportResult) -> None:
        # BuildKit compares only the time and the number of layers, not the digests.
        created_at, count = result.created_at, len(result.chain)
        for existing in self._results:
            if existing.created_at == created_at and len(existing.chain) == count:
                return
        self._results.append(result)

    def __repr__(self) -> str:
        return f"CacheNode({self.digest!r}, #{self._seq})"


def _add_link(parent: CacheNode, child: CacheNode, slot: int, selector: str) -> None:
    """Link ``child``'s input ``slot`` to ``parent`` (BuildKit's ``addChild``)."""
    key = (selector, slot, child.digest)
    children = parent._children
    if children is None:
        children = parent._children = {}
    nodes = children.get(key)
    if nodes is None:
        children[key] = {child: None}
    elif child in nodes:
        return
    else:
        nodes[child] = None
    parents = child._parents
    while slot >= len(parents):
        parents.append({})
    parents[slot][(parent, selector)] = None


class CacheGraph:
    """BuildKit's cache chains: roots by digest, nodes linked through input slots."""

    def __init__(self) -> None:
        self._roots: dict[str, CacheNode] = {}
        self._nodes: list[CacheNode] = []  # every node ever created, for release()
        # id(chain) -> (chain, chain without its top layer), for chains built by the parser:
        # lets marshal write a chain in one step when its parent chain is already written.
        self._prefixes: dict[int, tuple[tuple[Descriptor, ...], tuple[Descriptor, ...]]] = {}

    @property
    def roots(self) -> Mapping[str, CacheNode]:
        """Nodes without inputs, by digest."""
        return MappingProxyType(self._roots)

    def add_record(
        self,
        digest: str,
        inputs: Sequence[Sequence[tuple[str, CacheNode]]] = (),
        results: Iterable[tuple[GoTime, Sequence[Descriptor]]] = (),
    ) -> CacheNode | None:
        """Add a cache key with its input links and results; return its node.

        ``inputs`` has one entry per input slot, each a non-empty list of
        ``(selector, node)`` links to nodes of this graph; ``results`` are
        ``(created_at, layer descriptors root first)``. A ``random:`` digest is ignored
        (``None`` is returned), as BuildKit never reuses such keys.
        """
        check_record_digest(digest, "digest")
        deps: list[list[tuple[str, CacheNode]]] = []
        for i, slot in enumerate(inputs):
            if not slot:
                raise FormatError(f"empty dependency for {digest}", f"inputs[{i}]")
            links = []
            for j, (selector, node) in enumerate(slot):
                if type(selector) is not str:
                    raise FormatError(
                        f"selector must be a string, got {show(selector)}", f"inputs[{i}][{j}]"
                    )
                if not isinstance(node, CacheNode) or node._graph is not self:
                    raise FormatError(
                        "dependency is not a node of the same cache graph", f"inputs[{i}][{j}]"
                    )
                links.append((selector, node))
            deps.append(links)
        checked = []
        for k, (created_at, chain) in enumerate(results):
            if not isinstance(created_at, GoTime):
                raise FormatError(f"expected a GoTime, got {show(created_at)}", f"results[{k}]")
            layers = tuple(chain)
            for layer in layers:
                if not isinstance(layer, Descriptor):
                    raise FormatError(f"expected a Descriptor, got {show(layer)}", f"results[{k}]")
            checked.append(ExportResult(created_at, layers))
        return self._add(digest, deps, checked)

    def _new_node(self, digest: str, results: list[ExportResult]) -> CacheNode:
        node = CacheNode(self, digest, len(self._nodes))
        self._nodes.append(node)
        node._results = results
        return node

    def _add(
        self,
        digest: str,
        deps: list[list[tuple[str, CacheNode]]],
        results: list[ExportResult],
    ) -> CacheNode | None:
        """BuildKit's ``CacheChains.Add`` on validated arguments."""
        if digest.startswith(RANDOM_PREFIX):
            return None
        if not deps:
            node = self._roots.get(digest)
            if node is None:
                node = self._roots[digest] = self._new_node(digest, results)
            else:
                for result in results:
                    node._add_result(result)
            return node

        matches = self._matching(digest, deps)
        if not matches:
            # A new node takes the results as given (BuildKit de-duplicates only on merge).
            node = self._new_node(digest, results)
        else:
            node = matches[0] if len(matches) == 1 else self._merge(matches)
            for result in results:
                node._add_result(result)
            deps = self._drop_descendants(node, deps)
        for slot, links in enumerate(deps):
            for selector, parent in links:
                _add_link(parent, node, slot, selector)
        return node

    @staticmethod
    def _matching(digest: str, deps: list[list[tuple[str, CacheNode]]]) -> list[CacheNode]:
        """Existing nodes with this digest reached through one of the links of every slot.

        Uses each parent's child index (keyed by selector, slot and digest): the cost is
        the number of links, not the size of the graph.
        """
        found: dict[CacheNode, None] | None = None
        for slot, links in enumerate(deps):
            candidates: dict[CacheNode, None] = {}
            for selector, parent in links:
                children = parent._children
                nodes = None if children is None else children.get((selector, slot, digest))
                if nodes:
                    candidates.update(nodes)
            if found is None:
                found = candidates
            else:
                found = {node: None for node in found if node in candidates}
            if not found:
                return []
        return list(found) if found else []

    @staticmethod
    def _merge(nodes: list[CacheNode]) -> CacheNode:
        """Fold several matching nodes into the first one found, as BuildKit merges them.

        "First" is the first of the candidates of the first slot, in the order the links
        and children were added (BuildKit takes the first a Go map yields). The others keep
        their own parents (so they stay in the graph), their children and results are
        copied to the survivor, and the children now link to it.
        """
        main = nodes[0]
        for other in nodes[1:]:
            moved = other._children or {}
            if moved and main._children is None:
                main._children = {}
            for key, children in moved.items():
                target = main._children.setdefault(key, {})  # type: ignore[union-attr]
                for child in children:
                    target[child] = None
                    for i, links in enumerate(child._parents):
                        child._parents[i] = {
                            (main if parent is other else parent, selector): None
                            for parent, selector in links
                        }
                    extra = child._extra_parents
                    if extra is None:
                        extra = child._extra_parents = {}
                    extra[other] = None
                    extra[main] = None
            for result in other._results:
                main._add_result(result)
        return main

    @staticmethod
    def _drop_descendants(
        node: CacheNode, deps: list[list[tuple[str, CacheNode]]]
    ) -> list[list[tuple[str, CacheNode]]]:
        """Remove links from ``node`` itself or from its descendants (they would loop).

        BuildKit walks every descendant of ``node``; walking up from each linked node
        instead answers the same question in the size of the build's history, which is
        small, rather than the size of everything built on top of ``node``.
        """
        cleared: set[CacheNode] = set()
        verdict: dict[CacheNode, bool] = {}

        def below(start: CacheNode) -> bool:
            if start is node:
                return True
            seen = {start}
            stack = [start]
            while stack:
                current = stack.pop()
                ups: list[CacheNode] = [p for links in current._parents for p, _ in links]
                if current._extra_parents:
                    ups.extend(current._extra_parents)
                for up in ups:
                    if up is node:
                        return True
                    if up not in seen and up not in cleared:
                        seen.add(up)
                        stack.append(up)
            cleared.update(seen)
            return False

        kept: list[list[tuple[str, CacheNode]]] = []
        for links in deps:
            slot = []
            for selector, parent in links:
                is_below = verdict.get(parent)
                if is_below is None:
                    is_below = verdict[parent] = below(parent)
                if not is_below:
                    slot.append((selector, parent))
            kept.append(slot)
        return kept

    def release(self) -> None:
        """Unlink every node, leaving the graph empty, so reference counting frees it now.

        Nodes link both ways (inputs and children), so a dropped graph is cyclic garbage
        that waits for the cycle collector, which then walks every object of a large cache
        (about as long as marshalling it). Call this when the graph is no longer needed.
        """
        for node in self._nodes:
            node._children = None
            node._parents = []
            node._extra_parents = None
            node._results = []
        self._nodes = []
        self._roots = {}
        self._prefixes = {}

    def nodes(self) -> list[CacheNode]:
        """Every node reachable from the roots, depth first."""
        return self._walk(leaves_only=False)

    def leaves(self) -> list[CacheNode]:
        """Nodes that no other node links to: where ``marshal`` starts."""
        return self._walk(leaves_only=True)

    def _walk(self, *, leaves_only: bool) -> list[CacheNode]:
        seen: set[CacheNode] = set()
        out: list[CacheNode] = []
        for root in self._roots.values():
            stack = [root]
            while stack:
                node = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                if not leaves_only or not node._children:
                    out.append(node)
                if node._children:
                    for children in reversed(node._children.values()):
                        stack.extend(reversed(children))
        return out


# --- reading a config --------------------------------------------------------------------

_UNSEEN, _VISITING, _DONE, _DONE_RANDOM = 0, 1, 2, 3


def parse_graph(cfg: CacheConfig, descriptors: Mapping[str, Descriptor]) -> CacheGraph:
    """Read a config into a graph as BuildKit's ``ParseConfig`` does.

    ``descriptors`` maps blob digests to layer descriptors; results whose layers (or any
    parent) have none are dropped silently. Raises FormatError for ``invalid record ID``,
    ``invalid looping record``, ``invalid empty input for record N``, ``invalid layer
    index N`` and ``invalid looping layer``, the first one BuildKit would meet.

    BuildKit reads a record's linked records first, recursively, then its results, then
    adds it. This does the same in two passes (configs can be far deeper than Python's
    recursion limit): the first walks the links depth first and lists records in the
    order they would be added; the second adds them. A link error found by the first pass
    is raised only after the second pass has added every record BuildKit would have added
    before meeting it, so that an earlier result error wins, as it would in BuildKit.
    """
    order: list[int] = []
    with paused_gc():
        try:
            _order_records(cfg.records, order)
        except FormatError as link_error:
            _add_records(CacheGraph(), cfg, descriptors, order)
            raise link_error from None
        graph = CacheGraph()
        _add_records(graph, cfg, descriptors, order)
    return graph


def _links_of(record: CacheRecord) -> Iterator[tuple[int, int, int]]:
    """(slot, link position, linked record) in reading order; position -1: an empty slot."""
    for i, slot in enumerate(record.inputs):
        if not slot:
            yield i, -1, -1
        for j, link in enumerate(slot):
            yield i, j, link.link


def _order_records(records: Sequence[CacheRecord], order: list[int]) -> None:
    """Append record indexes to ``order`` in BuildKit's add order; raise link errors."""
    count = len(records)
    state = bytearray(count)
    for top in range(count):
        if state[top]:
            continue
        state[top] = _VISITING
        stack = [(top, _links_of(records[top]))]
        while stack:
            index, links = stack[-1]
            for i, j, target in links:
                if j < 0:
                    raise FormatError(
                        f"invalid empty input for record {index}", f"records[{index}].inputs[{i}]"
                    )
                if not 0 <= target < count:
                    raise FormatError(
                        f"invalid record ID: {target}", f"records[{index}].inputs[{i}][{j}].link"
                    )
                seen = state[target]
                if seen == _UNSEEN:
                    state[target] = _VISITING
                    stack.append((target, _links_of(records[target])))
                    break
                if seen != _DONE:
                    # Being read (a loop), or a random: record, which BuildKit remembers
                    # exactly like a record being read.
                    detail = "" if seen == _VISITING else f" (record {target} has a random: digest)"
                    raise FormatError(
                        "invalid looping record" + detail,
                        f"records[{index}].inputs[{i}][{j}].link",
                    )
            else:
                stack.pop()
                order.append(index)
                random = records[index].digest.startswith(RANDOM_PREFIX)
                state[index] = _DONE_RANDOM if random else _DONE


def _add_records(
    graph: CacheGraph,
    cfg: CacheConfig,
    descriptors: Mapping[str, Descriptor],
    order: list[int],
) -> None:
    records = cfg.records
    nodes: list[CacheNode | None] = [None] * len(records)
    chains = _Chains(cfg, descriptors, graph._prefixes)
    for index in order:
        record = records[index]
        results = chains.results(index)
        deps: list[list[tuple[str, CacheNode]]] = []
        for i, slot in enumerate(record.inputs):
            links = []
            for j, link in enumerate(slot):
                node = nodes[link.link]
                if node is None:
                    raise FormatError(
                        f"failed to add record {index}: linked record {link.link} has a "
                        "random: digest",
                        f"records[{index}].inputs[{i}][{j}].link",
                    )
                links.append((link.selector, node))
            deps.append(links)
        nodes[index] = graph._add(record.digest, deps, results)


class _Chains:
    """Layer chains of a config, each computed once (BuildKit's ``getRemoteChain``)."""

    def __init__(
        self,
        cfg: CacheConfig,
        descriptors: Mapping[str, Descriptor],
        prefixes: dict[int, tuple[tuple[Descriptor, ...], tuple[Descriptor, ...]]],
    ) -> None:
        self._cfg = cfg
        self._descriptors = descriptors
        self._prefixes = prefixes
        # layer index -> descriptors root first, or None when a blob has no descriptor
        self._memo: dict[int, tuple[Descriptor, ...] | None] = {}

    def results(self, index: int) -> list[ExportResult]:
        record = self._cfg.records[index]
        out = []
        memo = self._memo
        for k, result in enumerate(record.results):
            layer = result.layer
            if layer in memo:
                chain = memo[layer]
            else:
                chain = self.chain(layer, f"records[{index}].layers[{k}].layer")
            if chain is not None:
                out.append(ExportResult(result.created_at, chain))
        layers = self._cfg.layers
        for k, chained in enumerate(record.chains):
            descriptors = []
            for m, layer in enumerate(chained.layers):
                if not 0 <= layer < len(layers):
                    raise FormatError(
                        f"invalid layer index {layer}", f"records[{index}].chains[{k}].layers[{m}]"
                    )
                descriptor = self._descriptors.get(layers[layer].blob)
                if descriptor is None:
                    break
                descriptors.append(descriptor)
            else:
                out.append(ExportResult(chained.created_at, tuple(descriptors)))
        return out

    def chain(self, start: int, where: str) -> tuple[Descriptor, ...] | None:
        """Descriptors of layer ``start`` and its parents, root first; None if one is missing.

        Iterative (parent chains can be far deeper than Python's recursion limit), with
        the checks in BuildKit's order: loop, index range, descriptor, parent.
        """
        memo = self._memo
        layers = self._cfg.layers
        path: list[tuple[int, Descriptor]] = []
        visited: set[int] = set()
        index = start
        came_from = ""
        base: tuple[Descriptor, ...] | None
        while True:
            if index in memo:
                base = memo[index]
                break
            if index in visited:
                raise FormatError(f"invalid looping layer ({came_from} = {index})", where)
            visited.add(index)
            if not 0 <= index < len(layers):
                suffix = f" ({came_from})" if came_from else ""
                raise FormatError(f"invalid layer index {index}{suffix}", where)
            layer = layers[index]
            descriptor = self._descriptors.get(layer.blob)
            if descriptor is None:
                memo[index] = None
                base = None
                break
            path.append((index, descriptor))
            if layer.parent == -1:
                base = ()
                break
            came_from = f"layers[{index}].parent"
            index = layer.parent
        chain = base
        for layer_index, descriptor in reversed(path):
            if chain is not None:
                parent = chain
                chain = (*parent, descriptor)
                if parent:
                    self._prefixes[id(chain)] = (chain, parent)
            memo[layer_index] = chain
        return chain
