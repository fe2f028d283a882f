"""The isolation watchdog's view of the stored placements, kept between checks, and the
violations found in each rack.

Every rule `scheduler.violations.find_violations` checks lies within one node (an accelerator,
a node; a shard's zone and its references are its own) but two, which lie within one rack (a
dedicated_rack tenant's isolation, two tenants excluding each other): a node's violations depend
only on the placements on it, the node, the deployments those placements name and the small
tables (rows, racks, tenants), a rack's on the tenants its nodes hold. So the view keeps the
violations by node and by rack, and what changed marks only the nodes and racks it touches to be
judged again (`dirty`): a placement written, moved or removed (its old and its new node), a node
changed, a deployment changed (the nodes of its placements), a tenant's contract (the nodes
holding it), a rack's row or a row's zone (the rack's nodes). A dirty node is judged alone
unless its rack holds a tenant with a rule of a rack's scope (dedicated_rack, or excluding
another: `ruled`) or had a violation of a rack's scope: then the rack is judged whole (as
`recheck.rack_rules_apply` decides for a plan). A tenant whose contract changed has its nodes
dirty, so a rack it joins or leaves the rules of is judged whole then.

Rows come in as read (`controller.store.isolation`, tuples). A row equal to the one the view
holds changes nothing and keeps its model objects: a full pass that reads every row again builds
only what changed, so each page it reads can go as soon as it is folded in. Placements on a node
the view does not know are kept under `UNKNOWN_RACK` (their REFERENCE violations).

Pure (no database). `check` is CPU work for a worker thread, while nothing else uses the view; it
judges in chunks of about `CHUNK` placements, so what one chunk builds is freed before the next
(a check of every node never holds the whole cluster's transient objects at once).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from controller.domain.values import deployment_key
from controller.store.isolation import Around, Contracts, Values
from controller.store.rollout import outgoing_id
from scheduler.interchange import shard_spec_from_dict
from scheduler.model import Deployment as SolverDeployment
from scheduler.model import Node as SolverNode
from scheduler.model import Placement as SolverPlacement
from scheduler.model import Problem, Rack as SolverRack, Row as SolverRow, ShardSpec, Tenant as SolverTenant
from scheduler.violations import Violation, find_violations

UNKNOWN_RACK = ""  # placements on nodes the view does not know
CHUNK = 2_000  # placements judged per `find_violations` call


@dataclass(slots=True)
class _Placed:
    values: Values  # `isolation.PLACEMENT_COLUMNS`
    label: str = ""  # the deployment label `model` was built with
    model: SolverPlacement | None = None  # built by the first check that judges it


@dataclass(frozen=True)
class Dirty:
    """What to judge again: nodes (ids) and racks."""

    nodes: frozenset[str]
    racks: frozenset[str]


@dataclass(frozen=True)
class HeldRows:
    """The rows a view holds, by id (`isolation` columns): what a view kept current from the
    change log is compared with one read whole."""

    nodes: dict[str, Values]
    deployments: dict[int, Values]
    placements: dict[int, Values]


@dataclass(frozen=True, slots=True)
class _Deployed:
    values: Values  # `isolation.DEPLOYMENT_COLUMNS`
    model: SolverDeployment  # its template revision's
    # Each revision a shard may have been placed with (a rollout's outgoing replicas keep their
    # older shard: judged by the new one, half-accelerator shards sharing an accelerator read as a
    # whole-accelerator shard shared), as the solver sees them (`rollout.outgoing_id`).
    revisions: dict[int, SolverDeployment]

    def of_revision(self, revision: int | None) -> SolverDeployment:
        return self.revisions.get(revision, self.model) if revision is not None else self.model


class IsolationView:
    """The placements, nodes, deployments and contracts as last read, and the violations of
    each node and rack as last judged (see the module docstring)."""

    def __init__(self) -> None:
        self._rows: dict[str, Values] = {}
        self._racks: dict[str, Values] = {}
        self._tenants: dict[str, Values] = {}
        self._contracts: tuple[tuple[SolverRow, ...], tuple[SolverRack, ...], tuple[SolverTenant, ...]] = ((), (), ())
        self._nodes: dict[str, tuple[Values, SolverNode]] = {}
        self._deployments: dict[int, _Deployed] = {}
        self._by_label: dict[str, int] = {}
        self._placements: dict[int, _Placed] = {}
        self._on_node: dict[str, set[int]] = {}  # node id -> placement ids
        self._of_deployment: dict[int, set[int]] = {}  # deployment id -> placement ids
        self._rack_nodes: dict[str, set[str]] = {}  # rack -> its nodes; UNKNOWN_RACK: unknown nodes holding placements
        self._violations: dict[tuple[str, str], list[Violation]] = {}  # by ("node", id) and ("rack", id)
        self._dirty_nodes: set[str] = set()
        self._dirty_racks: set[str] = set()
        self._ruled: frozenset[str] = frozenset()  # tenants dedicated_rack or excluding another

    # What it holds

    @property
    def violations(self) -> list[Violation]:
        """Every violation found, in a stable order (rule, scope, tenants)."""
        return sorted((v for found in self._violations.values() for v in found), key=lambda v: v.key)

    def held_rows(self) -> HeldRows:
        return HeldRows({n: node[0] for n, node in self._nodes.items()},
                        {d: deployed.values for d, deployed in self._deployments.items()},
                        {p: placed.values for p, placed in self._placements.items()})

    def rack_of(self, node_id: str) -> str:
        node = self._nodes.get(node_id)
        return UNKNOWN_RACK if node is None else node[1].rack

    def nodes_around(self, violations: Iterable[Violation]) -> set[str]:
        """The nodes whose placements make `violations`: the node of each, or every node of the rack."""
        nodes: set[str] = set()
        for v in violations:
            kind, where = _unit_of_scope(v.scope)
            nodes |= self.nodes_in((where,)) if kind == "rack" else {where}
        return nodes

    def nodes_in(self, racks: Iterable[str]) -> set[str]:
        return {node_id for rack in racks for node_id in self._rack_nodes.get(rack, ())}

    def mark_all(self) -> None:
        """Every node and rack to be judged again (a full check)."""
        self._dirty_nodes |= set(self._nodes) | set(self._on_node)
        self._dirty_racks |= set(self._rack_nodes)
        for kind, where in self._violations:
            (self._dirty_racks if kind == "rack" else self._dirty_nodes).add(where)

    # What changed

    def set_contracts(self, contracts: Contracts) -> None:
        """The small tables as read now: the nodes a changed row, rack or tenant concerns are dirty."""
        rows, racks, tenants = ({r[0]: r for r in table} for table in (contracts.rows, contracts.racks,
                                                                          contracts.tenants))
        if (rows, racks, tenants) == (self._rows, self._racks, self._tenants):
            return
        moved_rows = _changed(self._rows, rows)
        moved_racks = _changed(self._racks, racks)
        moved_racks |= {rack for table in (self._racks, racks) for rack, r in table.items() if r[1] in moved_rows}
        for node_id in self.nodes_in(moved_racks):
            self._dirty(node_id)
        for node_id in self._nodes_holding(_changed(self._tenants, tenants)):
            self._dirty(node_id)
        self._rows, self._racks, self._tenants = rows, racks, tenants
        self._ruled = frozenset(t[0] for t in tenants.values()
                                if getattr(t[1], "value", t[1]) == "dedicated_rack" or t[2])
        self._contracts = (
            tuple(SolverRow(r[0], r[1]) for r in rows.values()),
            tuple(SolverRack(r[0], r[1]) for r in racks.values()),
            tuple(SolverTenant(t[0], getattr(t[1], "value", t[1]), tuple(t[2] or ()), tuple(t[3] or ()) or None)
                  for t in tenants.values()))

    def put_nodes(self, rows: Iterable[Values]) -> None:
        for values in rows:
            node_id = values[0]
            old = self._nodes.get(node_id)
            if old is not None and old[0] == values:
                continue
            self._leave_rack(node_id)
            self._nodes[node_id] = (values, SolverNode(values[0], values[1], values[2], hbm_gib=values[3],
                                                       cpu_milli=values[4], memory_mib=values[5]))
            self._rack_nodes.setdefault(values[1], set()).add(node_id)
            self._dirty(node_id)

    def drop_node(self, node_id: str) -> None:
        if node_id not in self._nodes:
            return
        self._leave_rack(node_id)
        del self._nodes[node_id]
        if node_id in self._on_node:  # its placements now name an unknown node
            self._rack_nodes.setdefault(UNKNOWN_RACK, set()).add(node_id)
        self._dirty(node_id)

    def put_deployments(self, rows: Iterable[Values]) -> None:
        for values in rows:
            deployment_id = values[0]
            old = self._deployments.get(deployment_id)
            if old is not None and old.values == values:
                continue
            self.drop_deployment(deployment_id)
            label = deployment_key(values[2], values[1])
            current = SolverDeployment(label, values[2], 1, 1, ShardSpec(values[3], values[4], values[5], values[6],
                                                                        values[7]))
            revisions = {int(revision): SolverDeployment(outgoing_id(label, int(revision)), values[2], 1, 1,
                                                         shard_spec_from_dict(doc["shard"]))
                         for revision, doc in (values[9] or {}).items() if int(revision) != values[8]}
            self._deployments[deployment_id] = _Deployed(values, current, revisions)
            self._by_label[label] = deployment_id
            self._dirty_around(deployment_id)

    def drop_deployment(self, deployment_id: int) -> None:
        old = self._deployments.pop(deployment_id, None)
        if old is None:
            return
        if self._by_label.get(old.model.id) == deployment_id:
            del self._by_label[old.model.id]
        self._dirty_around(deployment_id)

    def put_placements(self, rows: Iterable[Values]) -> None:
        for values in rows:
            old = self._placements.get(values[0])
            if old is not None:
                if old.values == values:
                    continue
                self._unlink(old)
            self._placements[values[0]] = _Placed(values)
            node_id = values[4]
            self._on_node.setdefault(node_id, set()).add(values[0])
            self._of_deployment.setdefault(values[1], set()).add(values[0])
            if node_id not in self._nodes:
                self._rack_nodes.setdefault(UNKNOWN_RACK, set()).add(node_id)
            self._dirty(node_id)

    def drop_placement(self, placement_id: int) -> None:
        old = self._placements.pop(placement_id, None)
        if old is not None:
            self._unlink(old)

    def retain(self, *, nodes: Collection[str], deployments: Collection[int], placements: Collection[int]) -> None:
        """Forget every node, deployment and placement not among these (what a full read found)."""
        for placement_id in [p for p in self._placements if p not in placements]:
            self.drop_placement(placement_id)
        for deployment_id in [d for d in self._deployments if d not in deployments]:
            self.drop_deployment(deployment_id)
        for node_id in [n for n in self._nodes if n not in nodes]:
            self.drop_node(node_id)

    def apply(self, around: Around) -> None:
        """The rows read again around some deployments and nodes take the place of what the view
        held of them: what was asked and not found is gone, and so are their placements not read."""
        asked = {self._by_label[k] for k in around.deployment_keys if k in self._by_label}
        found = {d[0] for d in around.deployments if deployment_key(d[2], d[1]) in around.deployment_keys}
        for deployment_id in asked - found:
            self.drop_deployment(deployment_id)
        self.put_deployments(around.deployments)
        held = {p for d in asked | found for p in self._of_deployment.get(d, ())}
        held |= {p for n in around.node_ids for p in self._on_node.get(n, ())}
        read = {p[0] for p in around.placements}
        for placement_id in held - read:
            self.drop_placement(placement_id)
        self.put_placements(around.placements)
        for node_id in around.node_ids - {n[0] for n in around.nodes}:
            self.drop_node(node_id)
        self.put_nodes(around.nodes)

    def take_dirty(self) -> Dirty:
        """The nodes and racks to judge again, and none left dirty."""
        dirty = Dirty(frozenset(self._dirty_nodes), frozenset(self._dirty_racks))
        self._dirty_nodes, self._dirty_racks = set(), set()
        return dirty

    # Judging (CPU work: in a worker thread, while nothing else uses the view)

    def check(self, dirty: Dirty) -> int:
        """Judge the `dirty` nodes and racks again (see the module docstring): their violations
        replace what was found there. The number of placements judged."""
        dirty_in: dict[str, set[str]] = {rack: set() for rack in dirty.racks}
        for node_id in dirty.nodes:
            dirty_in.setdefault(self.rack_of(node_id), set()).add(node_id)
        whole = {rack for rack in dirty_in if self._judged_whole(rack)}
        groups: list[list[str]] = []  # a rack judged whole, or a node alone
        for rack, nodes in dirty_in.items():
            if rack in whole:
                groups.append(sorted(self._rack_nodes.get(rack, set()) | nodes))
            else:
                groups += [[node_id] for node_id in sorted(nodes)]
        for rack in whole:
            self._violations.pop(("rack", rack), None)
        judged = 0
        for nodes in self._chunks(groups):
            problem = self._problem(nodes)
            judged += len(problem.placements)
            for node_id in nodes:
                self._violations.pop(("node", node_id), None)
            for violation in find_violations(problem):
                unit = _unit_of_scope(violation.scope)
                if unit[0] == "node" or unit[1] in whole:  # a rack's are judged whole only
                    self._violations.setdefault(unit, []).append(violation)
        return judged

    def _judged_whole(self, rack: str) -> bool:
        """A rack holding a tenant with a rule of a rack's scope, or where one was broken."""
        if ("rack", rack) in self._violations:
            return True
        if not self._ruled:
            return False
        for node_id in self._rack_nodes.get(rack, ()):
            for placement_id in self._on_node.get(node_id, ()):
                deployed = self._deployments.get(self._placements[placement_id].values[1])
                if deployed is not None and deployed.model.tenant in self._ruled:
                    return True
        return False

    def _chunks(self, groups: Iterable[list[str]]) -> Iterator[list[str]]:
        """The groups' nodes in chunks of about `CHUNK` placements (a group whole in one)."""
        chunk: list[str] = []
        size = 0
        for group in groups:
            chunk += group
            size += sum(len(self._on_node.get(n, ())) for n in group)
            if size >= CHUNK:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _problem(self, node_ids: Iterable[str]) -> Problem:
        """The nodes, the placements on them and the deployments those name, as the solver's model."""
        nodes: list[SolverNode] = []
        placements: list[SolverPlacement] = []
        deployments: dict[str, SolverDeployment] = {}
        for node_id in node_ids:
            node = self._nodes.get(node_id)
            if node is not None:
                nodes.append(node[1])
            for placement_id in self._on_node.get(node_id, ()):
                placed = self._placements[placement_id]
                deployment_id = placed.values[1]
                deployed = self._deployments.get(deployment_id)
                if deployed is None:
                    placements.append(_model(placed, f"deployment #{deployment_id}"))
                    continue
                model = deployed.of_revision(placed.values[7])
                deployments[model.id] = model
                placements.append(_model(placed, model.id))
        rows, racks_, tenants = self._contracts
        return Problem(nodes=tuple(nodes), deployments=tuple(deployments.values()), rows=rows, racks=racks_,
                       tenants=tenants, placements=tuple(placements))

    # Indexes

    def _dirty(self, node_id: str) -> None:
        """The node to judge again, and its rack (the tenants it holds may have changed)."""
        self._dirty_nodes.add(node_id)
        self._dirty_racks.add(self.rack_of(node_id))

    def _leave_rack(self, node_id: str) -> None:
        self._dirty(node_id)
        _discard(self._rack_nodes, self.rack_of(node_id), node_id)

    def _unlink(self, placed: _Placed) -> None:
        placement_id, deployment_id, node_id = placed.values[0], placed.values[1], placed.values[4]
        _discard(self._on_node, node_id, placement_id)
        _discard(self._of_deployment, deployment_id, placement_id)
        if node_id not in self._nodes and node_id not in self._on_node:
            _discard(self._rack_nodes, UNKNOWN_RACK, node_id)
        self._dirty(node_id)

    def _dirty_around(self, deployment_id: int) -> None:
        """The nodes holding the deployment's placements."""
        for placement_id in self._of_deployment.get(deployment_id, ()):
            self._dirty(self._placements[placement_id].values[4])

    def _nodes_holding(self, tenants: set[str]) -> set[str]:
        if not tenants:
            return set()
        return {self._placements[p].values[4] for d in self._deployments.values() if d.values[2] in tenants
                for p in self._of_deployment.get(d.values[0], ())}


def _model(placed: _Placed, label: str) -> SolverPlacement:
    """The placement's solver object, built again only when its row or its deployment's label changed."""
    if placed.model is None or placed.label != label:
        v = placed.values
        placed.model, placed.label = SolverPlacement(label, v[2], v[3], v[4], tuple(json.loads(v[5])), v[6]), label
    return placed.model


def _unit_of_scope(scope: str) -> tuple[str, str]:
    """("rack", id) for a violation of a rack's scope, else ("node", id): "node N", "node N[i]"."""
    kind, _, where = scope.partition(" ")
    if kind == "rack":
        return "rack", where
    if where.endswith("]"):
        where = where.rpartition("[")[0]
    return "node", where


def _changed(before: dict[str, Values], after: dict[str, Values]) -> set[str]:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def _discard(index: dict[str, set[str]] | dict[str, set[int]] | dict[int, set[int]], key: object, member: object) -> None:
    members = index.get(key)  # type: ignore[call-overload]
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]  # type: ignore[arg-type]
