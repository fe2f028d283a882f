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
  that does not run (still loading, failed, or on a node whose work was evicted) serves nothing
  and goes at once. One on a down node not evicted yet is left as it is, like any work there: a
  node back before its eviction grace keeps its shards (controller/domain/liveness.py), and the
  replica then goes as a running one would; at the eviction it goes at once.

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

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.values import deployment_key
from controller.store.inlist import any_of
from controller.store.release import record_decisions, stop_placements
from controller.store.models import (
    Deployment, DeploymentPhase, Node, NodeHealth, Placement, ShardPhase,
)

# Replicas placed beyond the asked count while a rollout or drain replaces replicas (the
# default of `maia-controller --max-surge`).
DEFAULT_SURGE = 1
_SEPARATOR = "~"  # never in a deployment name or a tenant id

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


@dataclass
class SolverView:
    """What one stored deployment contributes to the problem."""

    deployments: list[dict[str, Any]] = field(default_factory=list)
    placements: list[dict[str, Any]] = field(default_factory=list)
    refs: dict[str, SolverRef] = field(default_factory=dict)


def solver_view(current_doc: dict[str, Any], template_revision: int, revision_specs: Mapping[str, Any],
                replicas: Iterable[StoredReplica], *, evicted: set[str], draining: set[str],
                surge: int = DEFAULT_SURGE) -> SolverView:
    """The solver deployments and placements of one stored deployment (see the module doc);
    `surge` replicas at most beyond the asked count while replicas are being replaced. An
    outgoing replica on an `evicted` node (down, its work evicted) is left out: the commit
    releases it (it is not placed again); one on a down node not evicted yet stays pinned."""
    key = current_doc["id"]
    current: list[StoredReplica] = []
    outgoing: dict[int, list[StoredReplica]] = defaultdict(list)
    for rep in sorted(replicas, key=lambda r: r.index):
        if rep.revision == template_revision and not rep.nodes & draining:
            current.append(rep)
        elif rep.nodes & evicted:
            continue  # an outgoing replica on an evicted node is not placed again: it is dropped
        elif rep.revision == template_revision or str(rep.revision) in revision_specs:
            outgoing[rep.revision].append(rep)
    asked = current_doc["replicas"]
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
        view.refs[key] = _add(view, key, template_revision, False, doc, current[:target])
    for revision, reps in sorted(outgoing.items()):
        spec = current_doc if revision == template_revision else revision_specs[str(revision)]
        solver_id = outgoing_id(key, revision)
        doc = dict(copy.deepcopy(spec), id=solver_id, replicas=len(reps), min_replicas=1, **group)
        view.deployments.append(doc)
        view.refs[solver_id] = _add(view, key, revision, True, doc, reps)
    return view


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


@dataclass
class _Replica:
    index: int
    revision: int
    ids: list[int] = field(default_factory=list)
    nodes: set[str] = field(default_factory=set)
    phases: list[ShardPhase] = field(default_factory=list)
    draining: bool = False
    down: bool = False
    away: bool = False  # on a down node whose work is not evicted yet: left as it is

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


async def retire_replaced(session: AsyncSession, *, now: datetime, actor: str = "controller") -> Retired:
    """Stop the outgoing replicas whose replacements run (the caller commits).

    Per deployment with outgoing replicas: those not running go at once, but for those on a down
    node not evicted yet (left until it is back or evicted); a running one goes only while the
    running replicas, without it, still number at least the replicas asked.
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
        rep.draining |= bool(draining)
        rep.down |= health is NodeHealth.DOWN
        rep.away |= health is NodeHealth.DOWN and evicted_at is None
    retired_ids: list[int] = []
    nodes: set[str] = set()
    changed: set[str] = set()
    lines: list[str] = []
    events: list[dict[str, Any]] = []
    for dep_id, dep in deps.items():
        reps = replicas.get(dep_id, {})
        current = [r for r in reps.values() if r.revision == dep.template_revision and not r.draining]
        outgoing = sorted((r for r in reps.values() if r not in current and not r.away), key=lambda r: r.index)
        running = sum(r.running(shards_of(dep, r.revision)) for r in reps.values())
        replacements = sorted(r.index for r in current if r.running(dep.shards_per_replica))
        gone: list[_Replica] = []
        for rep in sorted(outgoing, key=lambda r: r.running(shards_of(dep, r.revision))):
            if rep.running(shards_of(dep, rep.revision)):
                if running - 1 < dep.replicas:
                    break
                running -= 1
            gone.append(rep)
        for rep in gone:
            retired_ids += rep.ids
            nodes |= rep.nodes
            why = "its node is draining" if rep.draining else f"revision {rep.revision} replaced by {dep.template_revision}"
            key = deployment_key(dep.tenant_id, dep.name)
            line = (f"{key}: replica {rep.index} stopped on {', '.join(sorted(rep.nodes))} ({why}); "
                    f"running replicas of revision {dep.template_revision}: {replacements or 'none'}")
            lines.append(line)
            events.append({"kind": "deployment.replica_retired", "object_kind": "deployment", "object_id": key,
                           "message": line, "data": {"replica": rep.index, "revision": rep.revision,
                                                     "nodes": sorted(rep.nodes), "draining": rep.draining,
                                                     "replacements": replacements},
                           "tenant": dep.tenant_id})
        replacing |= len(gone) < len(outgoing)
        left = {r.revision for r in reps.values() if r not in gone}
        specs = {k: v for k, v in (dep.revision_specs or {}).items() if int(k) in left}
        if gone or specs != (dep.revision_specs or {}):
            dep.revision_specs = specs
            changed.add(deployment_key(dep.tenant_id, dep.name))
        if gone:
            dep.generation = dep.generation + 1
    if not retired_ids:
        return Retired(deployments=frozenset(changed), replacing=replacing)
    await stop_placements(session, retired_ids, nodes, now, changed)
    await record_decisions(session, events, now, actor)
    return Retired(nodes=frozenset(nodes), deployments=frozenset(changed), lines=tuple(lines), replacing=replacing)
