"""Lookups into a snapshot's problem document that cost what they return, not the cluster.

A plan commit re-checks the few replicas it lands against what lies around them (the racks of
the nodes they touch, the shards there, the specs of the deployments it names:
`plans.check._recheck`); a cached snapshot (`scheduling/cache/`) is followed by its owner from
pass to pass, its lists appended to (arrivals, their placements) or rebuilt without what
departed. Walking the whole document for each of these costs milliseconds per commit at
thousands of nodes, on the event loop; a `SnapshotIndex` (kept with its `Snapshot`, across the
`dataclasses.replace` copies a cache makes of it) holds them grouped instead:

- nodes by id and by rack, racks by id and by row: read again whole when the document holds
  another list (a node or topology change replaces it; nothing changes one in place);
- placements by node and by stored deployment, deployments by stored deployment: read whole
  once, then only what was appended since; a departure's lists are cut by the index itself
  (`depart`); read again whole when the document holds another list. What they return is in
  the list's order.

Every list of the document is either replaced or appended to, never changed in place (the
owners of snapshots keep to it: `scheduling/cache/`); the index holds the lists it read, so
another list is never taken for one it read. One thread at a time uses it, as its snapshot.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Mapping
from operator import itemgetter
from typing import Any

from controller.store.rollout import stored_key

Doc = dict[str, Any]


class _Grouped:
    """The documents of one appended-to list grouped by keys (each document under one key per
    grouping), with their order in the list (a sequence number: a departure's removal keeps the
    order of the rest)."""

    def __init__(self, *keys: Callable[[Doc], str]) -> None:
        self._keys = keys
        self._source: list[Doc] | None = None  # held: its id is never another list's
        self._read = 0
        self._seq = 0
        # Each read document's sequence number, in the list's order: an array of machine integers,
        # which the cyclic collector does not walk number by number (a departure makes it anew: a
        # list of the list's length would be one more young container for the next collection to
        # walk, as long as the document list itself).
        self._seqs = array("q")
        self._groups: tuple[dict[str, dict[int, Doc]], ...] = tuple({} for _ in keys)
        self.whole_reads = 0  # lists read whole (a replaced one, or one changed otherwise than said)

    def of(self, items: list[Doc]) -> tuple[dict[str, dict[int, Doc]], ...]:
        """The groupings of `items` (the document's list now), by key: sequence number -> document."""
        if items is not self._source or len(items) < self._read:
            self._source, self._read = items, 0
            self._groups, self._seqs = tuple({} for _ in self._keys), array("q")
            self.whole_reads += 1
        if self._read < len(items):
            groups = tuple(zip(self._keys, self._groups))
            seq = self._seq
            for item in items[self._read:]:
                for key, grouped in groups:
                    grouped.setdefault(key(item), {})[seq] = item
                seq += 1
            self._seqs.extend(range(self._seq, seq))
            self._seq, self._read = seq, len(items)
        return self._groups

    def select(self, items: list[Doc], grouping: int, keys: Iterable[str]) -> list[Doc]:
        """The documents of `items` under `keys` in `grouping`, in the list's order."""
        grouped = self.of(items)[grouping]
        return _in_order(entry for key in set(keys) for entry in grouped.get(key, {}).items())

    def cut(self, items: list[Doc], grouping: int, keys: Collection[str], leaves: Callable[[Doc], bool]) -> list[Doc]:
        """`items` (the document's list now) without the documents under `keys` in `grouping`
        for which `leaves` holds: a new list, cut from `items` by slices (or `items` itself when
        none leaves), which the index has read. A cost of what leaves, not of the list's
        documents one by one."""
        groups = self.of(items)
        leaving = sorted((seq, item) for key in keys for seq, item in groups[grouping].get(key, {}).items()
                         if leaves(item))
        if not leaving:
            return items
        kept: list[Doc] = []
        seqs = array("q")
        start = 0
        for seq, item in leaving:
            at = bisect_left(self._seqs, seq, start)
            kept += items[start:at]
            seqs += self._seqs[start:at]
            start = at + 1
            for key_of, grouped in zip(self._keys, groups):
                under = grouped[key_of(item)]
                del under[seq]
                if not under:
                    del grouped[key_of(item)]
        kept += items[start:]
        seqs += self._seqs[start:]
        self._source, self._read, self._seqs = kept, len(kept), seqs
        return kept


def _in_order(entries: Iterable[tuple[int, Doc]]) -> list[Doc]:
    """Documents given with their place in a list, in the list's order."""
    return [doc for _, doc in sorted(entries, key=itemgetter(0))]


def _node_of(p: Doc) -> str:
    return p["node"]


def _key_of_placement(p: Doc) -> str:
    return stored_key(p["deployment"])


def _key_of_deployment(d: Doc) -> str:
    return stored_key(d["id"])


class SnapshotIndex:
    """Lookups into one snapshot's problem document (see the module doc). Not to be changed by
    its users: what it returns is its own."""

    def __init__(self) -> None:
        self._nodes: list[Doc] | None = None
        self._node_by_id: dict[str, Doc] = {}
        self._on_rack: dict[str, list[tuple[int, Doc]]] | None = None  # (place in the list, node), built when first asked
        self._racks: list[Doc] | None = None
        self._row_of: dict[str, str] = {}
        self._in_row: dict[str, list[tuple[int, Doc]]] = {}  # (place in the list, rack)
        self._placements = _Grouped(_node_of, _key_of_placement)
        self._deployments = _Grouped(_key_of_deployment)

    def read(self, problem: Mapping[str, Any]) -> None:
        """Read what of `problem` the index has not read yet (an owner that replaced a list reads
        it in its worker thread, so that the event loop's next lookup finds it read)."""
        self._on_racks(problem)
        self._topology(problem)
        self._placements.of(problem.get("placements", []))
        self._deployments.of(problem.get("deployments", []))

    # Nodes and racks.
    def nodes_by_id(self, problem: Mapping[str, Any]) -> dict[str, Doc]:
        """The document's nodes by id, in the list's order."""
        nodes = problem.get("nodes", [])
        if nodes is not self._nodes:
            self.took_nodes(nodes, {n["id"]: n for n in nodes})
        return self._node_by_id

    def took_nodes(self, nodes: list[Doc], by_id: dict[str, Doc]) -> None:
        """`nodes` is the document's list now, `by_id` its documents by id in its order (built by the caller)."""
        self._nodes, self._node_by_id, self._on_rack = nodes, by_id, None

    def nodes_on(self, problem: Mapping[str, Any], racks: Iterable[str]) -> list[Doc]:
        """The document's nodes on `racks`, in the list's order."""
        on_rack = self._on_racks(problem)
        return _in_order(entry for rack in set(racks) for entry in on_rack.get(rack, ()))

    def _on_racks(self, problem: Mapping[str, Any]) -> dict[str, list[tuple[int, Doc]]]:
        by_id = self.nodes_by_id(problem)
        if self._on_rack is None:
            on_rack: dict[str, list[tuple[int, Doc]]] = {}
            for at, n in enumerate(by_id.values()):
                on_rack.setdefault(n["rack"], []).append((at, n))
            self._on_rack = on_rack
        return self._on_rack

    def _topology(self, problem: Mapping[str, Any]) -> None:
        racks = problem.get("racks", [])
        if racks is not self._racks:
            self._racks = racks
            self._row_of = {r["id"]: r["row"] for r in racks}
            self._in_row = {}
            for at, r in enumerate(racks):
                self._in_row.setdefault(r["row"], []).append((at, r))

    def row_of(self, problem: Mapping[str, Any]) -> dict[str, str]:
        """The row of each rack of the document."""
        self._topology(problem)
        return self._row_of

    def racks_in(self, problem: Mapping[str, Any], rows: Collection[str]) -> list[Doc]:
        """The document's racks in `rows`, in the list's order."""
        self._topology(problem)
        return _in_order(entry for row in set(rows) for entry in self._in_row.get(row, ()))

    # Placements and deployments.
    @property
    def whole_reads(self) -> int:
        """How many times a list of placements or deployments was read whole (its first read
        included): the lists' owners keep it to those they replace."""
        return self._placements.whole_reads + self._deployments.whole_reads

    def placements_on(self, problem: Mapping[str, Any], nodes: Iterable[str]) -> list[Doc]:
        """The document's placements on `nodes`, in the list's order."""
        return self._placements.select(problem.get("placements", []), 0, nodes)

    def placements_of(self, problem: Mapping[str, Any], keys: Iterable[str]) -> list[Doc]:
        """The document's placements of the stored deployments `keys` (every solver deployment
        of each: `store/rollout.py`), in the list's order."""
        return self._placements.select(problem.get("placements", []), 1, keys)

    def placed_on(self, problem: Mapping[str, Any], node: str) -> set[str]:
        """The solver deployments with shards on `node` (empty: none)."""
        placed = self._placements.of(problem.get("placements", []))[0].get(node)
        return {p["deployment"] for p in placed.values()} if placed else set()

    def deployments_of(self, problem: Mapping[str, Any], keys: Iterable[str]) -> list[Doc]:
        """The document's solver deployments of the stored deployments `keys`, in the list's order."""
        return self._deployments.select(problem.get("deployments", []), 0, keys)

    def depart(self, problem: dict[str, Any], gone: Collection[str]) -> None:
        """Take the solver deployments whose id is in `gone` (departures: every solver deployment
        of theirs, outgoing revisions too) and their placements out of `problem`: its lists are
        replaced by lists without them (one left as it was when none of them is in it), which the
        index has read (a cost of what leaves)."""
        problem["deployments"] = self._deployments.cut(problem.get("deployments", []), 0, gone,
                                                       lambda d: d["id"] in gone)
        problem["placements"] = self._placements.cut(problem.get("placements", []), 1, gone,
                                                     lambda p: p["deployment"] in gone)
