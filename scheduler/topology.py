"""Index-based view of a Problem: every id becomes a dense integer, every per-node fact an array.

The solver works on integers and numpy arrays (one entry per node, rack, row, zone, tenant or
deployment) so that a filter over 4,096 nodes is a handful of vector operations, not a Python
loop. `Topology` is immutable and built once per solve; the mutable occupancy lives in
`state.ClusterState`. (A warm session flips a few node facts in place: readiness, condition,
nominations.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.model import Deployment, Nomination, Problem

# A resource a node (or budget a domain) does not declare is not limited; a large finite number
# keeps integer division and subtraction well defined where infinity would not be.
UNLIMITED = 1e15
# A node without `max_shards` holds any number of shards: the slot filters' "unlimited"
# (`filters.BIG`), so a room computed from it reads as no bound.
SHARDS_UNLIMITED = 1 << 40
LEVELS = ("node", "rack", "row", "zone")


@dataclass(frozen=True)
class Topology:
    problem: Problem
    node_ids: tuple[str, ...]
    rack_ids: tuple[str, ...]
    row_ids: tuple[str, ...]
    zone_ids: tuple[str, ...]
    tenant_ids: tuple[str, ...]
    node_index: dict[str, int]
    rack_index: dict[str, int]
    tenant_index: dict[str, int]
    deployment_index: dict[str, int]
    node_rack: np.ndarray          # (N,) rack of each node
    node_row: np.ndarray           # (N,)
    node_zone: np.ndarray          # (N,)
    rack_row: np.ndarray           # (R,)
    row_zone: np.ndarray           # (W,)
    node_ready: np.ndarray         # (N,) bool: takes new shards
    node_alive: np.ndarray         # (N,) bool: not down (draws idle power, keeps shards)
    node_accelerators: np.ndarray  # (N,) installed: indices run 0..accelerators-1
    node_healthy: np.ndarray       # (N,) installed and not `unhealthy_accelerators`
    acc_usable: np.ndarray         # (N, A) bool: the index exists on the node and is healthy
    node_failed: dict[int, frozenset[int]]  # node -> its `unhealthy_accelerators` (only nodes with some)
    node_hbm: np.ndarray           # (N,) per accelerator, UNLIMITED if undeclared
    node_cpu: np.ndarray           # (N,)
    node_mem: np.ndarray           # (N,)
    node_idle_w: np.ndarray        # (N,)
    node_max_shards: np.ndarray    # (N,) int: `Node.max_shards`, SHARDS_UNLIMITED if none
    shards_capped: bool            # some node has `max_shards` (else the rule costs nothing)
    node_model: tuple[str | None, ...]
    node_condition: list[str | None]  # `Node.condition`: flipped in place with `node_ready` (a session's cordons)
    rack_budget: np.ndarray        # (R,) UNLIMITED if none
    row_budget: np.ndarray         # (W,)
    tenant_isolation: tuple[str, ...]
    tenant_excludes: np.ndarray    # (T, T) bool, symmetric
    tenant_zone_ok: np.ndarray     # (T, Z) bool
    tenant_max_milli: np.ndarray   # (T,) UNLIMITED if none
    tenant_max_power: np.ndarray   # (T,)
    tenant_reserved_milli: np.ndarray  # (T,)
    max_accelerators: int
    # The problem's `nominations` (a list a warm session replaces in place: `nominate`) and,
    # per node, the index of the one naming it (-1: none).
    nominations: list[Nomination]
    node_nominated: np.ndarray     # (N,)

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    def nominate(self, nominations: Sequence[Nomination]) -> np.ndarray:
        """Replace the nominations, each with the nodes known here (a node named twice is the
        later one's); the nodes whose nomination changed (another deployment or priority, or
        none): what per-node caches must judge again."""
        def key(noms: Sequence[Nomination], i: int) -> tuple[str, int] | None:
            return None if i < 0 else (noms[i].deployment, noms[i].priority)
        old, before = list(self.nominations), self.node_nominated.copy()
        self.node_nominated[:] = -1
        for i, nom in enumerate(nominations):
            self.node_nominated[[self.node_index[n] for n in nom.nodes if n in self.node_index]] = i
        index, at = self.node_index, self.node_nominated
        self.nominations[:] = [
            Nomination(nom.deployment, nom.priority, tuple(n for n in nom.nodes if n in index and at[index[n]] == i))
            for i, nom in enumerate(nominations)]
        either = np.flatnonzero((before >= 0) | (self.node_nominated >= 0))
        return np.array([n for n in either.tolist() if key(old, int(before[n]))
                         != key(self.nominations, int(self.node_nominated[n]))], dtype=np.int64)

    def refusing(self, dep: Deployment) -> tuple[tuple[str, int], ...]:
        """The nominations whose nodes take no new shard of `dep` (those for another deployment
        of its priority or higher), as (deployment, priority): what a cache of admitted nodes is
        kept per (a node's stamp moves when its nomination does, `nominate`)."""
        return tuple(sorted({(n.deployment, n.priority) for n in self.nominations if refuses(n, dep)}))

    def nominated_against(self, dep: Deployment, nodes: np.ndarray | None = None) -> np.ndarray | None:
        """Per node (of `nodes`, else all), whether it is nominated for another deployment of
        `dep`'s priority or higher, so takes no new shard of it (None: no node is)."""
        if not self.nominations:
            return None
        refused = np.array([refuses(n, dep) for n in self.nominations] + [False], dtype=bool)
        if not refused.any():
            return None
        return refused[self.node_nominated if nodes is None else self.node_nominated[nodes]]  # -1: the last, False

    def node_state(self, n: int) -> str:
        """The node's state as the arrays say (a warm session flips them in place)."""
        if not self.node_alive[n]:
            return "down"
        return "ready" if self.node_ready[n] else "cordoned"

    def node_said(self, n: int) -> str:
        """The node's state in the reasons' words: its `condition` when it has one, else its state."""
        return self.node_condition[n] or self.node_state(n)

    def domain_of(self, level: str) -> np.ndarray:
        """Per node, the index of its domain at `level` ('none' maps every node to 0)."""
        if level == "node":
            return np.arange(self.n_nodes)
        if level == "rack":
            return self.node_rack
        if level == "row":
            return self.node_row
        if level == "zone":
            return self.node_zone
        return np.zeros(self.n_nodes, dtype=np.int64)

    def domain_name(self, level: str, index: int) -> str:
        names = {"node": self.node_ids, "rack": self.rack_ids, "row": self.row_ids,
                 "zone": self.zone_ids}.get(level)
        return names[index] if names is not None else "cluster"

    def n_domains(self, level: str) -> int:
        return {"node": len(self.node_ids), "rack": len(self.rack_ids),
                "row": len(self.row_ids), "zone": len(self.zone_ids)}.get(level, 1)

    def model_mask(self, dep: Deployment) -> np.ndarray:
        models = dep.shard.accelerator_models
        if models is None:
            return np.ones(self.n_nodes, dtype=bool)
        allowed = set(models)
        return np.fromiter((m in allowed for m in self.node_model), dtype=bool,
                           count=self.n_nodes)


def refuses(nomination: Nomination, dep: Deployment) -> bool:
    """Whether a nomination's nodes take no new shard of `dep`: it is for another deployment, of
    `dep`'s priority or higher."""
    return nomination.priority >= dep.priority and nomination.deployment != dep.id


def build_topology(problem: Problem) -> Topology:
    zone_ids = tuple(z.id for z in problem.zones)
    zone_index = {z: i for i, z in enumerate(zone_ids)}
    row_ids = tuple(r.id for r in problem.rows)
    row_index = {r: i for i, r in enumerate(row_ids)}
    rack_ids = tuple(r.id for r in problem.racks)
    rack_index = {r: i for i, r in enumerate(rack_ids)}
    node_ids = tuple(n.id for n in problem.nodes)
    tenant_ids = tuple(t.id for t in problem.tenants)
    tenant_index = {t: i for i, t in enumerate(tenant_ids)}

    rack_row = np.array([row_index[r.row] for r in problem.racks], dtype=np.int64)
    row_zone = np.array([zone_index[r.zone] for r in problem.rows], dtype=np.int64)
    node_rack = np.array([rack_index[n.rack] for n in problem.nodes], dtype=np.int64)
    node_row = rack_row[node_rack] if len(node_rack) else np.zeros(0, dtype=np.int64)
    node_zone = row_zone[node_row] if len(node_row) else np.zeros(0, dtype=np.int64)

    def opt(values: list[float | None]) -> np.ndarray:
        return np.array([UNLIMITED if v is None else float(v) for v in values], dtype=float)

    n_t = len(tenant_ids)
    excludes = np.zeros((n_t, n_t), dtype=bool)
    zone_ok = np.ones((n_t, len(zone_ids)), dtype=bool)
    for i, t in enumerate(problem.tenants):
        for other in t.excludes:
            j = tenant_index[other]
            excludes[i, j] = excludes[j, i] = True
        if t.zones is not None:
            zone_ok[i, :] = False
            for z in t.zones:
                zone_ok[i, zone_index[z]] = True

    accelerators = np.array([n.accelerators for n in problem.nodes], dtype=np.int64)
    width = int(accelerators.max(initial=0))
    usable = np.arange(max(width, 1))[None, :] < accelerators.reshape(-1, 1)
    failed = {i: frozenset(n.unhealthy_accelerators) for i, n in enumerate(problem.nodes) if n.unhealthy_accelerators}
    for i, indices in failed.items():
        usable[i, list(indices)] = False
    max_shards = np.array([SHARDS_UNLIMITED if n.max_shards is None else min(n.max_shards, SHARDS_UNLIMITED)
                           for n in problem.nodes], dtype=np.int64)
    topo = Topology(
        problem=problem, node_ids=node_ids, rack_ids=rack_ids, row_ids=row_ids,
        zone_ids=zone_ids, tenant_ids=tenant_ids,
        node_index={n: i for i, n in enumerate(node_ids)}, rack_index=rack_index,
        tenant_index=tenant_index,
        deployment_index={d.id: i for i, d in enumerate(problem.deployments)},
        node_rack=node_rack, node_row=node_row, node_zone=node_zone, rack_row=rack_row,
        row_zone=row_zone,
        node_condition=[n.condition for n in problem.nodes],
        node_ready=np.array([n.state == "ready" for n in problem.nodes], dtype=bool),
        node_alive=np.array([n.state != "down" for n in problem.nodes], dtype=bool),
        node_accelerators=accelerators,
        node_hbm=opt([n.hbm_gib for n in problem.nodes]),
        node_cpu=opt([n.cpu_milli for n in problem.nodes]),
        node_mem=opt([n.memory_mib for n in problem.nodes]),
        node_idle_w=np.array([n.idle_power_w for n in problem.nodes], dtype=float),
        node_max_shards=max_shards, shards_capped=bool((max_shards < SHARDS_UNLIMITED).any()),
        node_model=tuple(n.accelerator_model for n in problem.nodes),
        rack_budget=opt([r.power_budget_w for r in problem.racks]),
        row_budget=opt([r.power_budget_w for r in problem.rows]),
        tenant_isolation=tuple(t.isolation for t in problem.tenants),
        tenant_excludes=excludes, tenant_zone_ok=zone_ok,
        tenant_max_milli=opt([None if t.max_accelerators is None else t.max_accelerators * 1000
                              for t in problem.tenants]),
        tenant_max_power=opt([t.max_power_w for t in problem.tenants]),
        tenant_reserved_milli=np.array([t.reserved_accelerators * 1000
                                        for t in problem.tenants], dtype=float),
        max_accelerators=width,
        node_healthy=usable.sum(axis=1).astype(np.int64), acc_usable=usable, node_failed=failed,
        nominations=[], node_nominated=np.full(len(node_ids), -1, dtype=np.int64),
    )
    topo.nominate(problem.nominations)
    return topo
