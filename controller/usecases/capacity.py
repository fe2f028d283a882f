"""What the registered cluster could ever hold: aggregates for the submit path's judgement.

A submission is refused when no state of the registered cluster could ever run it (no node of
its accelerator model, a shard bigger than any node, a shard drawing more power than any rack
and row could give it, a rack-local gang bigger than any rack). Judging that by loading every
node on every submit made the submit cost grow with the cluster; `CapacityIndex` keeps, per
(accelerator model, zone), the largest node, the most HBM, the most power one node's shards
could ever draw, and the accelerators of every rack, row and zone, so one judgement costs the
groups it touches. `CapacityCache` keeps one index per capacity generation, which database
triggers bump on every change of a node's capacity, idle power, rack or existence, a rack's row
or budget, a row's zone or budget (migrations 0012, 0022, 0036: never for a statement that
changed none of those): the index is rebuilt (one plain-column query) only after such a change,
never per submit nor after a placement commit, and a second controller's (or a hand edit's)
node changes are seen too.

The power a node's shards could ever draw (`PowerRoom`) is its rack's budget, or its row's if
smaller, less the node's own idle power: a budget counts the idle power of every node of the
domain that is not down, so with the others down that is what is left (no budget: no bound).

A rebuild reads every node's plain columns (one Core statement: ~5 ms of the event loop's CPU at
16,384 nodes, ~14 ms with the ORM's result processing) and builds the index from them in a worker
thread (at 4,096 nodes ~3-5 ms, at 16,384 ~12-17 ms of CPU, since the index's loop makes its
comparisons inline; 20-35 and 70-125 ms before: docs/benchmarks.md, `capidx`): the event loop keeps
turning meanwhile, the thread handing the interpreter back every switch interval, where a rebuild
was one step of the loop of ~40 ms at 16,384 nodes (`capthread`). The submit batch that first met a
new generation paid it inside its transaction: after a join, the first submits queued behind it
(docs/benchmarks.md, `p99at50`: 11 of a 50/s run's 25 slowest submits).
`CapacityRefresher` rebuilds it in the background once a moved generation has held still for a
poll, so submits usually find it built; a submit that finds it stale still rebuilds it first, as
before, so no judgement is ever made on an old index.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork

log = logging.getLogger("maia.capacity")

LOCALITIES = ("rack", "row", "zone")


class NodeCapacity(NamedTuple):
    """One node's row as `repo.node_capacities` reads it (a named tuple: a rebuild makes one a node)."""

    node_id: str
    rack: str
    row: str
    zone: str
    accelerator_model: str
    accelerators: int
    hbm_gib: float | None
    idle_power_w: float = 0.0
    rack_budget_w: float | None = None  # None: no budget
    row_budget_w: float | None = None


class PowerRoom(NamedTuple):
    """The most power one node's shards could ever draw (`watts`; inf: no budget binds), which
    node, and the budget that binds it (`code` POWER_RACK or POWER_ROW, its domain and watts)."""

    watts: float
    node_id: str
    code: str = ""
    domain: str = ""
    budget_w: float = math.inf
    idle_power_w: float = 0.0


UNBOUNDED = PowerRoom(math.inf, "")  # a node whose rack and row have no budget (no node named)


def _power_room(node: NodeCapacity) -> PowerRoom:
    """The room of a node whose rack or row has a budget (one with neither is `UNBOUNDED`)."""
    rack = math.inf if node.rack_budget_w is None else node.rack_budget_w
    row = math.inf if node.row_budget_w is None else node.row_budget_w
    code, domain, budget = ("POWER_RACK", node.rack, rack) if rack <= row else ("POWER_ROW", node.row, row)
    return PowerRoom(budget - node.idle_power_w, node.node_id, code, domain, budget, node.idle_power_w)


@dataclass
class _Group:
    """The nodes of one accelerator model in one zone."""

    # Ties go to the smallest id (what a scan in id order would name).
    largest: tuple[int, str] = (-1, "")           # (accelerators, node)
    most_hbm: tuple[float, str] = (-1.0, "")      # (HBM GiB, node), over nodes that say
    without_hbm: int = 0                          # nodes that do not say their HBM
    most_power: PowerRoom = PowerRoom(-math.inf, "")
    nodes: int = 0
    domains: dict[str, dict[str, int]] = field(default_factory=lambda: {k: defaultdict(int) for k in LOCALITIES})


class CapacityIndex:
    """Per (accelerator model, zone): the largest node, the most HBM, accelerators per domain."""

    def __init__(self, nodes: Iterable[NodeCapacity]) -> None:
        # A node's few comparisons and sums inline (a rebuild is one loop of every node: 16,384 at
        # ~6 us a node, with a `_Group` made and dropped for each and `_best` called twice, was
        # ~100 ms; docs/benchmarks.md, `capidx`). Same answers as `_best_of`: the larger amount, on
        # a tie the smaller id.
        self._groups: dict[tuple[str, str], _Group] = {}
        groups = self._groups
        for node in nodes:
            node_id, rack, row, zone, model, accelerators, hbm_gib, idle_w, rack_budget, row_budget = node
            g = groups.get((model, zone))
            if g is None:
                g = groups[(model, zone)] = _Group()
            largest, largest_id = g.largest
            if accelerators > largest or (accelerators == largest and node_id < largest_id):
                g.largest = (accelerators, node_id)
            g.nodes += 1
            if hbm_gib is None:
                g.without_hbm += 1
            else:
                most, most_id = g.most_hbm
                if hbm_gib > most or (hbm_gib == most and node_id < most_id):
                    g.most_hbm = (hbm_gib, node_id)
            best = g.most_power
            if best is not UNBOUNDED:  # one node without a budget: no bound in the group
                if rack_budget is None and row_budget is None:
                    g.most_power = UNBOUNDED
                else:  # the watts inline, the `PowerRoom` (`_power_room`) only for a new best
                    watts = min(math.inf if rack_budget is None else rack_budget,
                                math.inf if row_budget is None else row_budget) - idle_w
                    if watts > best.watts or (watts == best.watts and node_id < best.node_id):
                        g.most_power = _power_room(node)
            domains = g.domains
            domains["rack"][rack] += accelerators
            domains["row"][row] += accelerators
            domains["zone"][zone] += accelerators

    def empty(self) -> bool:
        return not self._groups

    def models(self) -> list[str]:
        return sorted({model for model, _ in self._groups})

    def select(self, models: set[str] | None, zones: set[str] | None) -> CapacityView:
        """The nodes of those models (None: any) in those zones (None: anywhere)."""
        return CapacityView([g for (model, zone), g in self._groups.items()
                             if (models is None or model in models) and (zones is None or zone in zones)])


@dataclass(frozen=True)
class CapacityView:
    groups: list[_Group]

    def empty(self) -> bool:
        return not self.groups

    def largest_node(self) -> tuple[int, str]:
        return _best_of(g.largest for g in self.groups)

    def most_hbm(self) -> tuple[float, str] | None:
        """The most HBM of one node, or None when some node does not say its HBM."""
        if any(g.without_hbm for g in self.groups):
            return None
        return _best_of(g.most_hbm for g in self.groups)

    def most_power(self) -> PowerRoom:
        """The most power one of these nodes' shards could ever draw (`PowerRoom.watts` inf: unbounded)."""
        return min((g.most_power for g in self.groups), key=lambda r: (-r.watts, r.node_id))

    def largest_domain(self, locality: str) -> tuple[int, str]:
        """(accelerators, domain id) of the domain holding the most of these nodes' accelerators."""
        if locality == "node":
            return self.largest_node()
        if len(self.groups) == 1:
            held = self.groups[0].domains[locality]
        else:
            held = defaultdict(int)
            for g in self.groups:
                for domain, n in g.domains[locality].items():
                    held[domain] += n
        return _best_of((n, domain) for domain, n in held.items())


    def domain_count(self, level: str) -> int:
        """How many nodes, racks, rows or zones hold these nodes."""
        if level == "node":
            return sum(g.nodes for g in self.groups)
        return len(set().union(*(g.domains[level] for g in self.groups)))


def _best_of(items: Iterable[tuple[Any, str]]) -> Any:
    """The larger amount; on a tie the smaller id."""
    return min(items, key=lambda x: (-x[0], x[1]))


class CapacityCache:
    """One `CapacityIndex` per capacity generation."""

    def __init__(self) -> None:
        self._generation: int | None = None
        self._index = CapacityIndex(())
        self._rebuilding = asyncio.Lock()  # one rebuild at a time: concurrent submits wait for it
        self.rebuilds = 0

    async def index(self, uow: UnitOfWork, generation: int | None = None) -> CapacityIndex:
        """The index at the capacity generation stored now (`generation`: already read by the caller)."""
        if generation is None:
            generation = await repo.read_capacity_generation(uow.session)
        if generation == self._generation:
            return self._index
        async with self._rebuilding:
            if self._generation is None or generation > self._generation:
                # The generation first: a node change after it bumps it again and rebuilds.
                self._index = await load_index(uow)
                self._generation = generation
                self.rebuilds += 1
        return self._index


async def load_index(uow: UnitOfWork) -> CapacityIndex:
    """The index of every node stored now, built in a worker thread (module docstring)."""
    rows = await repo.node_capacities(uow.session)
    return await asyncio.to_thread(_index_of, rows)


def _index_of(rows: Iterable[Iterable[Any]]) -> CapacityIndex:
    return CapacityIndex(map(NodeCapacity._make, rows))


# How often the stored capacity generation is read for `CapacityRefresher` (a one-row read).
CAPACITY_POLL_S = 1.0


class CapacityRefresher:
    """Rebuilds `cache`'s index off the submit path (module docstring): every `every_s` it reads
    the stored capacity generation and rebuilds once a generation other than the index's has been
    read twice in a row (held still for a poll: a join moves it at every node, and one rebuild
    after it is enough)."""

    def __init__(self, db: Database, cache: CapacityCache, *, every_s: float = CAPACITY_POLL_S) -> None:
        self._db = db
        self._cache = cache
        self._every_s = every_s
        self._seen: int | None = None  # the generation the last poll read

    async def poll_once(self) -> bool:
        """One poll; whether it rebuilt the index."""
        async with self._db.unit_of_work() as uow:
            generation = await repo.read_capacity_generation(uow.session)
            settled, self._seen = generation == self._seen, generation
            if not settled:
                return False
            rebuilds = self._cache.rebuilds
            await self._cache.index(uow, generation)  # at the index's generation already: no rebuild
            return self._cache.rebuilds > rebuilds

    async def run(self) -> None:
        """Poll every `every_s` until cancelled; a failed poll (the database away) is tried again at the next."""
        while True:
            await asyncio.sleep(self._every_s)
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 (the submits rebuild it themselves meanwhile)
                log.debug("capacity index not refreshed: %s: %s", type(exc).__name__, exc)
