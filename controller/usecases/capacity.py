"""What the registered cluster could ever hold: aggregates for the submit path's judgement.

A submission is refused when no state of the registered cluster could ever run it (no node of
its accelerator model, a shard bigger than any node, a rack-local gang bigger than any rack).
Judging that by loading every node on every submit made the submit cost grow with the
cluster; `CapacityIndex` keeps, per (accelerator model, zone), the largest node, the most HBM
and the accelerators of every rack, row and zone, so one judgement costs the groups it
touches. `CapacityCache` keeps one index per capacity generation, which database triggers
bump on every change of a node's capacity, rack or existence, a rack's row or a row's zone
(migrations 0012, 0022: never for a statement that changed none of those): the index is rebuilt (one plain-column query) only after such a change,
never per submit nor after a placement commit, and a second controller's (or a hand edit's)
node changes are seen too.

Rebuilding costs ~25 ms of the event loop at 4,096 nodes (the read and the index, measured in
process), and the submit batch that first met a new generation paid it inside its transaction:
after a join, the first submits queued behind it (docs/benchmarks.md, `p99at50`: 11 of a
50/s run's 25 slowest submits). `CapacityRefresher` rebuilds it in the background once a moved
generation has held still for a poll, so submits usually find it built; a submit that finds it
stale still rebuilds it first, as before, so no judgement is ever made on an old index.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork

log = logging.getLogger("maia.capacity")

LOCALITIES = ("rack", "row", "zone")


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    node_id: str
    rack: str
    row: str
    zone: str
    accelerator_model: str
    accelerators: int
    hbm_gib: float | None


@dataclass
class _Group:
    """The nodes of one accelerator model in one zone."""

    # Ties go to the smallest id (what a scan in id order would name).
    largest: tuple[int, str] = (-1, "")           # (accelerators, node)
    most_hbm: tuple[float, str] = (-1.0, "")      # (HBM GiB, node), over nodes that say
    without_hbm: int = 0                          # nodes that do not say their HBM
    domains: dict[str, dict[str, int]] = field(default_factory=lambda: {k: defaultdict(int) for k in LOCALITIES})


class CapacityIndex:
    """Per (accelerator model, zone): the largest node, the most HBM, accelerators per domain."""

    def __init__(self, nodes: Iterable[NodeCapacity]) -> None:
        self._groups: dict[tuple[str, str], _Group] = {}
        for n in nodes:
            g = self._groups.setdefault((n.accelerator_model, n.zone), _Group())
            g.largest = _best(g.largest, (n.accelerators, n.node_id))
            if n.hbm_gib is None:
                g.without_hbm += 1
            else:
                g.most_hbm = _best(g.most_hbm, (n.hbm_gib, n.node_id))
            g.domains["rack"][n.rack] += n.accelerators
            g.domains["row"][n.row] += n.accelerators
            g.domains["zone"][n.zone] += n.accelerators

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


def _best(a: tuple[Any, str], b: tuple[Any, str]) -> tuple[Any, str]:
    """The larger amount; on a tie the smaller id."""
    return _best_of((a, b))


def _best_of(items: Iterable[tuple[Any, str]]) -> Any:
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
    return CapacityIndex(NodeCapacity(*row) for row in await repo.node_capacities(uow.session))


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
