"""Replacing running replicas make-before-break: rolling updates and drains.

A replica is *outgoing* when it runs an older template revision of its deployment (the spec
changed in a way that needs new replicas) or sits on a draining node. Outgoing replicas keep
running until replacements run, the way a Kubernetes Deployment rolls with maxSurge (1 by
default, `maia-controller --max-surge`) and maxUnavailable 0:

- the snapshot (`solver_view`) hands the solver the deployment's current revision with room
  for its replicas minus the outgoing ones plus the surge replicas, and each outgoing revision
  as a deployment of its own (id `TENANT/NAME~REVISION`, its old spec, its replicas pinned where they
  run), so the solver accounts for what they hold and places replacements beside them; with a
  spread rule all of them name the deployment as their `spread_group` (scheduler/interchange.py),
  so a replacement goes where the spread holds with the outgoing replicas still running counted,
  where the solver finds such a place, and else where it holds once they are gone;
- after the replacements report running, `retire_replaced` stops outgoing replicas one at a
  time, never letting the running replicas drop below the replicas asked; an outgoing replica
  that does not run (still loading, or failed) serves nothing and goes at once. One on a down
  node not evicted yet is left as it is, like any work there: a node back before its eviction
  grace keeps its shards (controller/domain/liveness.py), and the replica then goes as a
  running one would; at the eviction it goes, unless it is of an older revision, not drained,
  and the deployment is short without it: `solver_view` then has it placed again at its
  revision, and `retire_replaced` keeps it while it starts again (`_placed_again`), so that a
  rollout whose new revision cannot be placed keeps a replica;
- a drain is measured against the replicas the deployment had placed when it began too: one
  short of its replicas (the cluster full) may never run them all, so a drained replica of it
  goes once the running replicas without it still number the smaller of the two (and at least
  `min_replicas`), that is once a replacement of its own runs; measured against the replicas
  asked alone, such a drain never ended, the room that freed going to new replicas.

Why a count recorded when the drain began: the state alone cannot tell a replacement from
growth toward the count. 48 of 52 replicas running, one of them drained, is where a drain starts
with nothing free (stopping the drained one would leave 47 of the 48 it ran), and where one that
started at 47 stands once room for one replica freed (stopping it leaves the 47 it ran). The
count is the drain's `node.draining` event's data (`{"placed_replicas": {"TENANT/NAME": N}}`,
`drain_baseline`; there is no column for it), a node's latest such event being its current
drain's (an uncordon ends a drain, a new drain writes a new one; the event retention keeps that
kind, `controller.store.retention`). A drain without it (begun by an older controller) keeps the
replicas-asked rule.

Replica indices in the database are stable identities the agents know; the solver wants each
deployment's replicas numbered 0..n-1. `SolverRef` maps one to the other, and `PlanKeys` maps a
plan back, giving new replicas the smallest indices no shard of the deployment uses.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import distinct, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from controller.domain.values import deployment_key
from controller.store.changes import will_change_deployment_shape, will_move_generation
from controller.store.inlist import any_of
from controller.store.release import record_decisions, stop_placements
from controller.store.models import (
    DRAIN_EVENT, Deployment, DeploymentPhase, Event, Node, NodeHealth, Placement, ShardPhase,
)

# Replicas placed beyond the asked count while a rollout or drain replaces replicas (the
# default of `maia-controller --max-surge`).
DEFAULT_SURGE = 1
_SEPARATOR = "~"  # never in a deployment name or a tenant id
# The event a drain starts with (`models.DRAIN_EVENT`, usecases/nodes.py) carries the drain's baseline.

ShardKey = tuple[str, int, int]


def outgoing_id(key: str, revision: int) -> str:
    """The solver id of a deployment's (key `TENANT/NAME`) outgoing replicas of one revision."""
    return f"{key}{_SEPARATOR}{revision}"


def stored_key(solver_id: str) -> str:
    """The key (`TENANT/NAME`) of the stored deployment a solver id stands for."""
    return solver_id.split(_SEPARATOR, 1)[0]


@dataclass(frozen=True, slots=True)
class SolverRef:
    """One solver deployment: which stored deployment and revision, and its replica numbering."""

    key: str  # the stored deployment's, TENANT/NAME
    revision: int
    outgoing: bool
    shards_per_replica: int
    replicas: Mapping[int, int] = field(default_factory=dict)  # solver replica -> stored replica


@dataclass(frozen=True, slots=True)
class StoredReplica:
    """One stored replica as the snapshot reads it."""

    index: int
    revision: int
    placements: tuple[dict[str, Any], ...]  # interchange placements, stored replica index
    nodes: frozenset[str]
    running: bool = False  # every shard of it runs


@dataclass
class SolverView:
    """What one stored deployment contributes to the problem."""

    deployments: list[dict[str, Any]] = field(default_factory=list)
    placements: list[dict[str, Any]] = field(default_factory=list)
    refs: dict[str, SolverRef] = field(default_factory=dict)


# What a deployment says that is not its template (`TEMPLATE_FIELDS`): it applies at once to the
# replicas of every revision. An outgoing revision kept its own: a rollout that raised the
# priority of a preemptible deployment had its new replicas preempt their own old ones, which
# ran no more while their replacements never started.
_NOW_FOR_EVERY_REVISION = ("priority", "preemptible")


def solver_view(current_doc: dict[str, Any], template_revision: int, revision_specs: Mapping[str, Any],
                replicas: Iterable[StoredReplica], *, evicted: set[str], draining: set[str],
                surge: int = DEFAULT_SURGE) -> SolverView:
    """The solver deployments and placements of one stored deployment (see the module doc);
    `surge` replicas at most beyond the asked count while replicas are being replaced. An
    outgoing replica on an `evicted` node (down, its work evicted) is left out, the commit
    releasing it, unless it is of an older revision and the deployment is short without it
    (then it is placed again at its revision); one on a down node not evicted yet stays pinned."""
    key = current_doc["id"]
    current: list[StoredReplica] = []
    outgoing: dict[int, list[StoredReplica]] = defaultdict(list)
    lost: list[StoredReplica] = []  # of an older revision, on an evicted node
    for rep in sorted(replicas, key=lambda r: r.index):
        if rep.revision == template_revision and not rep.nodes & draining:
            current.append(rep)
        elif rep.revision != template_revision and str(rep.revision) not in revision_specs:
            continue
        elif not rep.nodes & evicted:
            outgoing[rep.revision].append(rep)
        elif rep.revision != template_revision and not rep.nodes & draining:
            lost.append(rep)
    asked = current_doc["replicas"]
    # An older revision's replica on an evicted node (not a drained one) is placed again at its
    # revision (pinned where it was: the solver moves what is on a down node) while the current
    # revision's replicas and the outgoing ones on nodes not evicted number fewer than the
    # replicas asked, as a Kubernetes Deployment's old ReplicaSet recreates its pod: a rollout
    # whose new revision cannot be placed would otherwise be left with nothing. Others are dropped.
    short = asked - len(current) - sum(len(reps) for reps in outgoing.values())
    for rep in lost[:max(0, short)]:
        outgoing[rep.revision].append(rep)
    n_out = sum(len(reps) for reps in outgoing.values())
    target = asked if n_out == 0 else max(0, min(asked, asked + surge - n_out))
    # Replicas being replaced run on meanwhile: the spread counts them (one service to it).
    group = {"spread_group": key} if n_out and current_doc.get("spread") else {}
    view = SolverView()
    if target > 0:
        doc = dict(current_doc, replicas=target, **group)
        if n_out:  # during a rollout each replacement counts alone
            doc["min_replicas"] = 1
        view.deployments.append(doc)
        view.refs[key] = _add(view, key, template_revision, False, doc, _kept(current, target))
    for revision, reps in sorted(outgoing.items()):
        spec = current_doc if revision == template_revision else revision_specs[str(revision)]
        solver_id = outgoing_id(key, revision)
        doc = dict(copy.deepcopy(spec), id=solver_id, replicas=len(reps), min_replicas=1, **group)
        for name in _NOW_FOR_EVERY_REVISION:
            if name in current_doc:
                doc[name] = current_doc[name]
            else:
                doc.pop(name, None)
        view.deployments.append(doc)
        view.refs[solver_id] = _add(view, key, revision, True, doc, reps)
    return view


def _kept(replicas: list[StoredReplica], count: int) -> list[StoredReplica]:
    """The `count` of these replicas a smaller count keeps, in index order: those that run first,
    then the lowest indices (the lowest alone stopped a running replica for one still loading: a
    scale-down, a drained node uncordoned before its replacement ran)."""
    if len(replicas) <= count:
        return replicas
    return sorted(sorted(replicas, key=lambda r: (not r.running, r.index))[:count], key=lambda r: r.index)


def _add(view: SolverView, key: str, revision: int, outgoing: bool, doc: dict[str, Any],
         reps: list[StoredReplica]) -> SolverRef:
    mapping = {}
    for solver_replica, rep in enumerate(reps):
        mapping[solver_replica] = rep.index
        view.placements += [dict(p, deployment=doc["id"], replica=solver_replica) for p in rep.placements]
    return SolverRef(key, revision, outgoing, doc["shards_per_replica"], mapping)


class PlanKeys:
    """Maps a plan's (solver deployment, replica, shard) back to stored keys and revisions."""

    def __init__(self, refs: Mapping[str, SolverRef], used: Mapping[str, frozenset[int]]) -> None:
        self._refs = refs
        self._stored = used
        self._used: dict[str, set[int]] = {}  # copied from `used` per deployment given fresh indices
        self._fresh: dict[tuple[str, int], int] = {}

    def name(self, solver_id: str) -> str:
        """The key (`TENANT/NAME`) of the stored deployment a solver id stands for."""
        ref = self._refs.get(solver_id)
        return ref.key if ref is not None else solver_id

    def is_outgoing(self, solver_id: str) -> bool:
        ref = self._refs.get(solver_id)
        return ref is not None and ref.outgoing

    def shards_per_replica(self, solver_id: str) -> int | None:
        ref = self._refs.get(solver_id)
        return ref.shards_per_replica if ref is not None else None

    def replica(self, solver_id: str, replica: int) -> int | None:
        """The stored index of a solver replica (a new one gets a fresh index; None: an
        outgoing replica the solver would place anew, which is never done)."""
        ref = self._refs.get(solver_id)
        if ref is None:
            return replica
        stored = ref.replicas.get(replica)
        if stored is not None or ref.outgoing:
            return stored
        key = (solver_id, replica)
        if key not in self._fresh:
            used = self._used.get(ref.key)
            if used is None:
                used = self._used[ref.key] = set(self._stored.get(ref.key, ()))
            index = 0
            while index in used:
                index += 1
            used.add(index)
            self._fresh[key] = index
        return self._fresh[key]

    def key(self, solver_id: str, replica: int, shard: int) -> tuple[ShardKey, int] | None:
        """(stored shard key, revision) of a planned shard, or None (see `replica`)."""
        stored = self.replica(solver_id, replica)
        if stored is None:
            return None
        ref = self._refs.get(solver_id)
        return (self.name(solver_id), stored, shard), (ref.revision if ref is not None else 1)


# --- retiring replaced replicas ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Retired:
    """What `retire_replaced` stopped: nodes to tell, deployments changed, one line per replica."""

    nodes: frozenset[str] = frozenset()
    deployments: frozenset[str] = frozenset()
    lines: tuple[str, ...] = ()
    replacing: bool = False  # some deployment still has outgoing replicas
    # Rows locked to write and nothing written (each deployment changed since read): the caller
    # ends the transaction, else the pass's plan commit ran holding them.
    locked: bool = False


@dataclass
class _Replica:
    index: int
    revision: int
    ids: list[int] = field(default_factory=list)
    nodes: set[str] = field(default_factory=set)
    phases: list[ShardPhase] = field(default_factory=list)
    drained_on: set[str] = field(default_factory=set)  # its nodes that are draining
    down: bool = False
    away: bool = False  # on a down node whose work is not evicted yet, or not reported since: left as it is

    @property
    def draining(self) -> bool:
        return bool(self.drained_on)

    @property
    def failed(self) -> bool:
        return ShardPhase.FAILED in self.phases

    def running(self, shards: int) -> bool:
        return not self.down and len(self.phases) >= shards and all(p is ShardPhase.RUNNING for p in self.phases)


def shards_of(dep: Any, revision: int) -> int:
    """Shards per replica of `dep`'s replicas of `revision` (the spec they were placed with)."""
    if revision == dep.template_revision:
        return dep.shards_per_replica
    return int((dep.revision_specs or {}).get(str(revision), {}).get("shards_per_replica", dep.shards_per_replica))


async def any_draining(session: AsyncSession, node_ids: Iterable[str]) -> bool:
    """Whether one of these nodes is draining now: a change of nodes none of which is (one
    registered, up, down, cordoned, undrained) makes no replica outgoing, and the scan of every
    placement (`retire_replaced`) need not follow it (`reconcile.first_checks`)."""
    ids = sorted(set(node_ids))
    if not ids:
        return False
    draining = select(Node.id).where(any_of(session, Node.id, ids), Node.draining.is_(True)).limit(1)
    return (await session.execute(draining)).first() is not None


async def drain_baseline(session: AsyncSession, node_id: str) -> dict[str, int]:
    """The replicas placed now (on any node, in any phase) of each deployment (TENANT/NAME) with
    a shard on `node_id`: what a drain of the node starting now measures the retirement of those
    shards' replicas against (`retire_replaced`). The drain records it as its event's data
    (`{"placed_replicas": ...}`, usecases/nodes.py)."""
    held = select(Placement.deployment_id).where(Placement.node_id == node_id).distinct().scalar_subquery()
    rows = await session.execute(
        select(Deployment.tenant_id, Deployment.name, func.count(distinct(Placement.replica)))
        .join(Placement, Placement.deployment_id == Deployment.id)
        .where(Deployment.id.in_(held)).group_by(Deployment.id, Deployment.tenant_id, Deployment.name))
    return {deployment_key(tenant, name): int(count) for tenant, name, count in rows}


async def _drain_baselines(session: AsyncSession, node_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """The baseline (`drain_baseline`) each of these draining nodes' current drain recorded: its
    latest drain event's. A node whose event has none (an older controller's drain) is left out."""
    rows = await session.execute(
        select(Event.object_id, Event.data)
        .where(Event.object_kind == "node", Event.kind == DRAIN_EVENT,
               any_of(session, Event.object_id, sorted(node_ids)))
        .order_by(Event.id))
    latest: dict[str, Any] = {}
    for node_id, data in rows:
        latest[node_id] = (data or {}).get("placed_replicas")
    return {node_id: placed for node_id, placed in latest.items() if isinstance(placed, dict)}


async def _placed_again(session: AsyncSession, deps: Mapping[int, Any],
                        replicas: Mapping[int, Mapping[int, _Replica]]) -> set[tuple[int, int]]:
    """(deployment id, replica) of the older revisions' replicas that do not run and are not
    drained, and either sit on an evicted node (`solver_view` places them again) or were moved
    or had lost shards placed again by a plan commit (a `shard.moved` or `shard.placed` event)
    since their deployment last rolled (its latest rolling `deployment.updated`): the replicas
    `retire_replaced` keeps while the deployment is short without them. It reads the events of
    those deployments only; one moved before `--event-ttl` and not running since counts as not
    moved (`controller.store.retention`)."""
    found: set[tuple[int, int]] = set()
    asked: dict[str, tuple[int, set[int]]] = {}
    for dep_id, dep in deps.items():
        for rep in replicas.get(dep_id, {}).values():
            if (rep.revision == dep.template_revision or rep.draining or rep.away
                    or rep.running(shards_of(dep, rep.revision))):
                continue
            if rep.down:
                found.add((dep_id, rep.index))
            else:
                asked.setdefault(deployment_key(dep.tenant_id, dep.name), (dep_id, set()))[1].add(rep.index)
    if not asked:
        return found
    moved: dict[str, set[int]] = defaultdict(set)
    rows = await session.execute(
        select(Event.object_id, Event.kind, Event.data)
        .where(Event.object_kind == "deployment", any_of(session, Event.object_id, sorted(asked)),
               Event.kind.in_(("shard.moved", "shard.placed", "deployment.updated")))
        .order_by(Event.id))
    for key, kind, data in rows:
        if kind == "deployment.updated":
            if (data or {}).get("rolling"):
                moved[key].clear()
        elif isinstance((data or {}).get("replica"), int):
            moved[key].add(data["replica"])
    for key, (dep_id, indices) in asked.items():
        found.update((dep_id, index) for index in indices & moved[key])
    return found


@dataclass
class _Retiring:
    """What `retire_replaced` would write of one deployment: the replicas it stops, the older
    revisions' specs it keeps, the current revision's replicas running."""

    dep: Any
    gone: list[_Replica]
    specs: dict[str, Any]
    replacements: list[int]


async def _write_deployments(session: AsyncSession, retiring: list[_Retiring]) -> list[_Retiring]:
    """Write each deployment's kept specs (and a new generation when it stops replicas) if no
    update changed it since `retire_replaced` read it, nor its placements to stop: those that
    were written. Read without a lock, a rollback landing meanwhile made an old replica current
    (its placements renumbered) and it was stopped as old; an update landing meanwhile lost its
    new revision's spec to this copy, and the next pass stopped that revision's replicas.

    PostgreSQL's lock order (store/changes.py): the placements to stop first (ascending id, read
    again as they are), then isolation_state (their DELETE's trigger takes it), then the
    deployments' rows, each by a conditional UPDATE on the resource version read."""
    if not retiring:
        return []
    await will_move_generation(session)  # before any row (the caller's commit moves the generation)
    ids = sorted(pid for r in retiring for rep in r.gone for pid in rep.ids)
    still: dict[int, int] = {}
    if ids:
        rows = await session.execute(select(Placement.id, Placement.revision).where(any_of(session, Placement.id, ids))
                                     .order_by(Placement.id).with_for_update(key_share=True))
        still = {pid: revision for pid, revision in rows}
        await will_change_deployment_shape(session)  # isolation_state, before the deployments' rows
    landed = []
    for r in sorted(retiring, key=lambda r: r.dep.id):
        if any(still.get(pid) != rep.revision for rep in r.gone for pid in rep.ids):
            continue  # gone, or made another revision's (a rollback) since read
        values: dict[str, Any] = {"revision_specs": r.specs}
        if r.gone:
            values["generation"] = Deployment.generation + 1
        written = await session.execute(
            update(Deployment).where(Deployment.id == r.dep.id, Deployment.resource_version == r.dep.resource_version)
            .values(**values).execution_options(synchronize_session=False))
        if not written.rowcount:
            continue  # updated since read
        set_committed_value(r.dep, "revision_specs", r.specs)
        if r.gone:
            set_committed_value(r.dep, "generation", r.dep.generation + 1)
        landed.append(r)
    return landed


def _kept_running(dep: Any, rep: _Replica, baselines: Mapping[str, Mapping[str, int]]) -> int:
    """How many replicas must still run once the running outgoing replica `rep` of `dep` has
    gone: the replicas asked; for a drained replica, no more than its deployment had placed when
    the drain of its node began (the most of those of its nodes), nor fewer than `min_replicas`.
    A drain with no baseline recorded keeps the replicas asked."""
    if not rep.draining:
        return dep.replicas
    key = deployment_key(dep.tenant_id, dep.name)
    placed = [baselines.get(node, {}).get(key) for node in rep.drained_on]
    if not all(isinstance(count, int) for count in placed):
        return dep.replicas
    return min(dep.replicas, max(dep.min_replicas, *placed))


async def retire_replaced(session: AsyncSession, *, now: datetime, actor: str = "controller") -> Retired:
    """Stop the outgoing replicas whose replacements run (the caller commits).

    Per deployment with outgoing replicas: those not running go at once, but for those on a down
    node not evicted yet (left until it is back or evicted) and an older revision's starting
    ones the deployment is short without (kept, see below); a running one goes only while the
    running replicas, without it, still number at least the replicas asked, or for one on a
    draining node at least as many as the deployment had placed when the drain began if that is
    fewer (`_kept_running`: a deployment short of its replicas never holds a drain for ever).
    Revisions left without replicas are forgotten. Bumps the cluster generation when anything
    is stopped, so the next pass places the next replacement."""
    outgoing_deps = set(await session.scalars(
        select(Placement.deployment_id).join(Deployment, Placement.deployment_id == Deployment.id)
        .join(Node, Placement.node_id == Node.id)
        .where(Deployment.phase.not_in([DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED]))
        .where(or_(Placement.revision != Deployment.template_revision, Node.draining.is_(True)))
        .distinct()))
    if not outgoing_deps:
        return Retired()
    replacing = False
    retiring: list[_Retiring] = []
    deps = {d.id: d for d in await session.scalars(
        select(Deployment).where(any_of(session, Deployment.id, outgoing_deps)))}
    rows = await session.execute(
        select(Placement.id, Placement.deployment_id, Placement.replica, Placement.revision, Placement.phase,
               Placement.node_id, Node.draining, Node.health, Node.evicted_at)
        .join(Node, Placement.node_id == Node.id).where(any_of(session, Placement.deployment_id, deps)))
    replicas: dict[int, dict[int, _Replica]] = defaultdict(dict)
    for pid, dep_id, index, revision, phase, node_id, draining, health, evicted_at in rows:
        rep = replicas[dep_id].setdefault(index, _Replica(index, revision))
        rep.ids.append(pid)
        rep.nodes.add(node_id)
        rep.phases.append(phase)
        if draining:
            rep.drained_on.add(node_id)
        rep.down |= health is NodeHealth.DOWN
        # Its node down and not evicted yet, or back (a Hello) with the shard UNKNOWN until its
        # agent's first heartbeat says how it is: stopped in that window as one that does not run,
        # a drained replica went with nothing free for it (a drain never takes a deployment below
        # what it ran before it, docs/rollout.md).
        rep.away |= evicted_at is None and (health is NodeHealth.DOWN or phase is ShardPhase.UNKNOWN)
    retired_ids: list[int] = []
    nodes: set[str] = set()
    changed: set[str] = set()
    lines: list[str] = []
    events: list[dict[str, Any]] = []
    outgoing_of: dict[int, list[_Replica]] = {}
    running_of: dict[int, int] = {}
    short_drains: set[str] = set()  # draining nodes whose drain may be measured by its baseline
    for dep_id, dep in deps.items():
        reps = replicas.get(dep_id, {})
        outgoing_of[dep_id] = sorted((r for r in reps.values() if (r.revision != dep.template_revision or r.draining)
                                      and not r.away), key=lambda r: r.index)
        running_of[dep_id] = sum(r.running(shards_of(dep, r.revision)) for r in reps.values())
        if running_of[dep_id] - 1 < dep.replicas:
            short_drains.update(node for r in outgoing_of[dep_id] for node in r.drained_on)
    baselines = await _drain_baselines(session, short_drains) if short_drains else {}
    lost_or_moved = await _placed_again(session, deps, replicas)
    for dep_id, dep in deps.items():
        reps = replicas.get(dep_id, {})
        current = [r for r in reps.values() if r.revision == dep.template_revision and not r.draining]
        outgoing, running = outgoing_of[dep_id], running_of[dep_id]
        replacements = sorted(r.index for r in current if r.running(dep.shards_per_replica))
        kept = {r.index: _kept_running(dep, r, baselines) for r in outgoing if r.running(shards_of(dep, r.revision))}
        # An older revision's replica that does not run goes at once, unless its node was evicted
        # or it was placed again since (`_placed_again`): of those, as many go as the replicas
        # placed exceed the asked ones and the current revision's not running yet (Kubernetes'
        # clean-up of unavailable old pods), so that a rollout whose new revision is not placed
        # keeps the old replica it starts again. One stuck starting since before the rollout
        # still goes at once, making room for its replacement.
        starting_may_go = len(reps) - dep.replicas - sum(not r.running(dep.shards_per_replica) for r in current)
        gone: list[_Replica] = []
        # Those that do not run first; of the running ones, those that must keep more running first.
        for rep in sorted(outgoing, key=lambda r: (r.index in kept, -kept.get(r.index, 0))):
            if rep.index in kept:
                if running - 1 < kept[rep.index]:
                    continue
                running -= 1
            elif not rep.failed and (dep_id, rep.index) in lost_or_moved:
                if starting_may_go <= 0:
                    continue
                starting_may_go -= 1
            gone.append(rep)
        # Still replacing while any outgoing replica is left, those on a down node not evicted
        # yet too: said done while they were all there, the next passes stopped looking (an
        # eviction and this controller's own commits do not call for a look) and the rollout
        # stalled, its replacement running beside the old replicas, until an unrelated change.
        replacing |= any(r not in gone and (r.revision != dep.template_revision or r.draining) for r in reps.values())
        left = {r.revision for r in reps.values() if r not in gone}
        specs = {k: v for k, v in (dep.revision_specs or {}).items() if int(k) in left}
        if gone or specs != (dep.revision_specs or {}):
            retiring.append(_Retiring(dep, gone, specs, replacements))
    landed = await _write_deployments(session, retiring)
    replacing |= len(landed) < len(retiring)  # one changed meanwhile: the next pass judges it again
    for r in landed:
        dep = r.dep
        key = deployment_key(dep.tenant_id, dep.name)
        changed.add(key)
        for rep in r.gone:
            retired_ids += rep.ids
            nodes |= rep.nodes
            why = "its node is draining" if rep.draining else f"revision {rep.revision} replaced by {dep.template_revision}"
            line = (f"{key}: replica {rep.index} stopped on {', '.join(sorted(rep.nodes))} ({why}); "
                    f"running replicas of revision {dep.template_revision}: {r.replacements or 'none'}")
            lines.append(line)
            events.append({"kind": "deployment.replica_retired", "object_kind": "deployment", "object_id": key,
                           "message": line, "data": {"replica": rep.index, "revision": rep.revision,
                                                     "nodes": sorted(rep.nodes), "draining": rep.draining,
                                                     "replacements": r.replacements},
                           "tenant": dep.tenant_id})
    if not retired_ids:
        return Retired(deployments=frozenset(changed), replacing=replacing, locked=bool(retiring) and not landed)
    await stop_placements(session, retired_ids, nodes, now, changed)
    await record_decisions(session, events, now, actor)
    return Retired(nodes=frozenset(nodes), deployments=frozenset(changed), lines=tuple(lines), replacing=replacing)
