"""Plan → database: the plan applier, one transaction per plan.

The solver works on a `Snapshot` taken at some cluster generation, without holding any lock
(solving takes seconds), so other commits may land meanwhile: another pass or controller, a
node going down, a cordon, a new contract. `commit_plan` takes the generation row's write
lock (commits serialise there), reads the committed state, and turns the plan into its changes
relative to the snapshot it was solved from, replica by replica, the way Nomad's plan applier
re-checks a plan against the state it lands on:
- a replica the plan leaves as the snapshot had it: nothing to write (even if it changed since);
- a replica someone else changed since the snapshot: not written, the next pass decides again;
- a replica the plan removes (preempted, scaled down, retired, lost with its node): removed;
- a replica the plan places or moves: re-checked against the committed state with the
  scheduler's own rules (`recheck.py`); one that no longer fits (or a new replica of a template
  replaced since the snapshot) is not written and is re-queued, the rest of the plan commits.
So concurrent plans are safe, and a plan solved from a stale snapshot still lands what holds.
The commit writes new, removed and moved shard rows, deployment phases/reasons/generations,
node assignment generations, events (`deployment.requeued` for what was turned away), and
audit entries for the decisions that place, preempt, remove or move a tenant's work (in the
same transaction: a decision is audited exactly when it is committed). `CommitResult.stale`
and `requeued` tell the caller to solve again.

A commit with a `scope` (deployment keys) speaks only for those deployments: it reads their
rows and placements (one statement), and, for the re-check, only the shards on the racks its
landing replicas touch, or on the nodes they land on when the re-check judges those alone
(`_judged_alone`), with totals of the rest of their rows and tenants where a budget or a quota
needs them (`_read_unread`): a fast pass that decides a few deployments on a cached snapshot
commits at the cost of those deployments, not of the cluster.
Such a commit reads and checks before it takes the lock, and under the lock reads its rows
again: when they and the generation are as before, the check stands (all else it depends on
moves the generation), and the lock is held for the reads and the writes alone. On PostgreSQL it
writes before it takes the lock, and the statement that takes it reads the rows again: when the
generation is as before and the rows are as written, the check stands and the lock is held for
the audit entries and the COMMIT alone; else the writes are undone and the commit goes lock first
(`_commit_locking_last`; also when its INSERT meets the unique key of a shard another commit
placed meanwhile).
On PostgreSQL a commit that takes the generation's row first (unscoped, or fallen back) does so
under the generation writers' advisory lock, exclusive, and one that takes it last under the same
lock, shared (the lock order: store/changes.py); and since agents' reports change shard phases
under no generation lock, one that takes it first reads again the shards of the deployments whose
rows it wrote, and reads and writes again when a report landed in between (`_ReportsSettled`).
`CommitResult.shards` and `requeued` tell such a caller what to apply to its cache.

Plans name solver deployments and replicas (`store/rollout.py`: a rolling update's outgoing
revisions are deployments of their own); the commit maps them back to stored keys with the
snapshot's `PlanKeys`.

Every other writer that changes what the solver reads (a node going down, a cordon, a new or
deleted deployment, a tenant contract) must call `bump_cluster_generation` in its own
transaction, saying what it changed (`domain.changes.ClusterChange`, logged in `cluster_changes`),
so the next pass knows its snapshot is stale and what to read again (`read_changes_since`).

The caller owns the transaction: run both inside one unit of work and `commit()` it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict, namedtuple
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Integer, Select, String, and_, bindparam, or_, case, delete, func, insert, select, true, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from controller.store import audit
from controller.store.changes import (  # noqa: F401  (bump_cluster_generation, read_changes_since: re-exported)
    ChangesSince, MissingGeneration, move_generation, move_generation_unread, moves_generation_first,
    bump_cluster_generation, log_change, logged_ids, prune_changes, read_changes_since, read_generation,
    will_move_generation)  # noqa: F401  (will_move_generation: re-exported)
from controller.store.inlist import (POSTGRESQL, any_of, any_of_named, any_of_named_in_order, dialect_of, listed,
                                      locked_in_order)
from controller.store.models import (
    ClusterChangeRow,
    ClusterState,
    Deployment,
    DeploymentPhase,
    Event,
    Node,
    Placement,
    Rack,
    ShardPhase,
    utcnow,
)
from controller.store.metering import (
    DeploymentMeter, NodeMeter, StartedShard, node_meters, start_intervals, stop_intervals,
)
from controller.store.recheck import (
    ReplicaKey, TenantUsage, Unread, capped, rack_rules_apply, recheck, shard_usage)
from controller.store.rollout import SolverRef, outgoing_id, shards_of, stored_key
from controller.store.snapshot import ShardKey, Snapshot, Where, load_spec_doc
from controller.store.marks import rowcount_unread
from controller.store import pg_driver
from controller.store.sqlite_driver import deferred_writes
from controller.domain.changes import ChangeKind, ClusterChange
from controller.domain.values import deployment_key, split_deployment_key
from controller.domain.phases import deployment_phase, replica_counts
from controller.domain.restarts import failure_reasons

if TYPE_CHECKING:  # the controller may import the solver's types; it never needs them at run time
    from scheduler import Plan

# Keeps `IN (...)` lists well under every backend's bound-parameter limit.
_CHUNK = 500

CHANGED_SINCE = "changed by another commit since the plan's snapshot"
# A commit names at most this many deployments in the change log (`domain.changes`), else none.
LOGGED_DEPLOYMENTS_MAX = 1_000
TEMPLATE_REPLACED = "the deployment's template changed since the plan's snapshot"


@dataclass(frozen=True)
class CommitResult:
    """What a committed plan changed (empty sets: the plan matched the stored state).

    Deployments are named by their keys, `TENANT/NAME` (`domain.deployment_key`)."""

    # Nodes whose desired shard set changed: send them a new AssignmentSet.
    changed_nodes: set[str]
    # Deployments whose placements changed (or that were deleted; each is named in the change log):
    # the live ones' generation was bumped. Empty exactly when the cluster generation did not move.
    changed_deployments: set[str]
    # The cluster generation after the commit (unchanged when no placement changed).
    generation: int
    # Deployments whose phase or reasons changed without a placement change.
    updated_deployments: set[str] = field(default_factory=set)
    # Deployments in phase DELETING whose shards were removed and whose row was deleted.
    deleted_deployments: set[str] = field(default_factory=set)
    # Deployments placed for the first time by this commit: seconds since they were created.
    first_placed_after_s: dict[str, float] = field(default_factory=dict)
    # The plan was solved from an older generation than the one it committed on: solve again.
    stale: bool = False
    # Replicas (stored deployment, replica) the plan placed or moved that no longer fit the
    # committed state, with why: not written, left for the next pass.
    requeued: dict[ReplicaKey, tuple[str, ...]] = field(default_factory=dict)
    # Every shard the commit wrote, by stored key (TENANT/NAME, replica, shard): where it is now
    # (node, accelerator indices, milli per accelerator or None for whole ones), None when
    # removed (preempted, scaled down, released, its deployment deleted). With `requeued`, what a
    # cache of the committed state needs to follow the commit without reading it again.
    shards: dict[ShardKey, Where | None] = field(default_factory=dict)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _will_change(snapshot: Snapshot, plan: Plan, scope: frozenset[str] | None) -> bool:
    """Whether a commit is expected to change placements, guessed before reading anything: a
    scoped commit (the fast path's: it names what it decides) that places a shard of its scope or
    removes something. A wrong guess costs one statement, never a wrong generation (`commit_plan`)."""
    if scope is None:
        return False
    keys = snapshot.plan_keys()
    return (any(keys.name(pl.deployment) in scope for pl in plan.placements)
            or any(key[0] in scope for key in snapshot.released) or any(key in scope for key in snapshot.deleting))


# Core, not the ORM's bulk INSERT (its per-row bookkeeping costs more than the statement here).
_INSERT_EVENT = insert(Event.__table__)


def _reason_dicts(reasons: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in reasons:
        reason: dict[str, Any] = {"code": r.code, "message": r.message}
        if getattr(r, "scope", None) is not None:
            reason["scope"] = r.scope
        out.append(reason)
    return out


@dataclass
class _Row:
    id: int
    deployment_id: int
    key: ShardKey
    node: str
    indices: list[int]
    milli: int | None
    phase: ShardPhase
    revision: int

    @property
    def where(self) -> Where:
        return self.node, tuple(self.indices), self.milli


def _where(p: Any) -> Where:
    """Where a plan's (or a snapshot document's) placement puts its shard."""
    if isinstance(p, dict):
        return p["node"], tuple(p["accelerator_indices"]), p.get("accelerator_milli")
    return p.node, tuple(p.accelerator_indices), p.accelerator_milli


@dataclass
class _Changes:
    """What of a plan is written: rows to insert (with their revision), move and delete;
    replicas turned away."""

    inserts: dict[ShardKey, Any] = field(default_factory=dict)
    revision_of: dict[ShardKey, int] = field(default_factory=dict)
    updates: list[tuple[_Row, Any]] = field(default_factory=list)
    deletes: list[_Row] = field(default_factory=list)
    requeued: dict[ReplicaKey, tuple[str, ...]] = field(default_factory=dict)
    # The nodes the landing replicas touch, from the document they were re-checked against (the
    # usage meter's, so it does not read them again).
    nodes: dict[str, NodeMeter] = field(default_factory=dict)


# What a plan commit reads and writes every pass is written with the tables' columns (Core): an
# ORM-enabled statement costs the event loop more per execution (its compile state, its rows
# built by the ORM's loader) for the same rows.
_DEPLOYMENTS = Deployment.__table__
_PLACEMENTS = Placement.__table__
_D, _P = _DEPLOYMENTS.c, _PLACEMENTS.c
_DEPLOYMENT_FIELDS = (
    _D.id, _D.name, _D.tenant_id, _D.phase, _D.generation, _D.reasons, _D.replicas, _D.shards_per_replica,
    _D.created_at, _D.template_revision, _D.revision_specs, _D.min_replicas, _D.shard_accelerators, _D.shard_power_w,
)
_PLACEMENT_FIELDS = (
    _P.id, _P.deployment_id, _P.replica, _P.shard, _P.node_id, _P.accelerator_indices, _P.accelerator_milli, _P.phase,
    _P.revision,
)
_EVERY_PLACEMENT = select(*_PLACEMENT_FIELDS)
# A deployment as a commit reads it (`_DEPLOYMENT_FIELDS`, by name).
_DeploymentRow = namedtuple("_DeploymentRow", [c.name for c in _DEPLOYMENT_FIELDS])
# Deployments whose shards no plan holds: a commit removes them (`_Committed.leaving`).
_LEAVING = (DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED)


@dataclass
class _Committed:
    """The committed state a commit reads under the generation lock: the deployments it speaks
    for (all, or its scope's) and their placements."""

    scope: frozenset[str] | None
    generation: int  # the cluster generation it was read at (under the lock), before this commit's
    deployments: dict[str, Any]  # key TENANT/NAME -> row (`_DEPLOYMENT_FIELDS`)
    live: set[str]  # neither being deleted nor quarantined
    current: dict[ShardKey, _Row]  # placements of live deployments
    leaving: list[_Row]  # placements of the others: the plan no longer holds them, removed
    # The rows the statements returned, which the rest is built of (`_read_committed`): the
    # deployments' (a scope's with their placements) and, unscoped, every placement.
    rows: tuple[list[Sequence[Any]], list[Sequence[Any]]] = field(
        default_factory=lambda: ([], []), compare=False, repr=False)

    def speaks_for(self, key: str) -> bool:
        return self.scope is None or key in self.scope


def _deployments_at_generation(where: ColumnElement[bool] | None, *, placed: bool = False,
                               locking: bool = False) -> Select[Any]:
    """The cluster generation less the parameter `moved_by` (`cluster_generation`) and the
    deployments `where` selects (every one: None), in one statement: the generation's row
    outer-joined to them, so a row of NULL deployment fields when none is selected; with
    `placed`, outer-joined to their placements too (`_PLACEMENT_FIELDS` after the deployment's:
    one row per placement, NULL ones for a deployment without). With `locking` (PostgreSQL), the
    same statement moves the generation by `moved_by` first (its row's lock, to the commit) and
    logs the change of kind `kind` with the ids `logged` (none: nothing logged) at the new one."""
    table = ClusterState.__table__
    moved_by = bindparam("moved_by", type_=Integer)
    state: Any = table
    if locking:
        state = (update(table).where(table.c.id == 1).values(generation=table.c.generation + moved_by)
                 .returning(table.c.id, table.c.generation).cte("moved"))
    joined = state.outerjoin(_DEPLOYMENTS, true() if where is None else where)
    if placed:
        joined = joined.outerjoin(_PLACEMENTS, _P.deployment_id == _D.id)
    query = (select((state.c.generation - moved_by).label("cluster_generation"),
                    *_DEPLOYMENT_FIELDS, *((c.label(f"placed_{c.name}") for c in _PLACEMENT_FIELDS) if placed else ()))
             .select_from(joined).where(state.c.id == 1))
    if locking:
        changes = ClusterChangeRow.__table__
        query = query.add_cte(insert(changes).from_select(
            [changes.c.generation, changes.c.kind, changes.c.object_id],
            select(state.c.generation, bindparam("kind", type_=String),
                   func.unnest(bindparam("logged", type_=ARRAY(String))))).cte("logged"))
    return query


@dataclass(frozen=True)
class _CommittedQueries:
    """`_read_committed`'s statements for one dialect, built once (building a statement and its
    cache key costs more CPU than running it): every deployment, and a scope's (its lists named
    `tenants` and `names`) with their placements, read alone or (`scoped_locking`) by the statement
    that moves the generation."""

    every: Select[Any]
    scoped: Select[Any]
    scoped_locking: Select[Any]

    @classmethod
    def of(cls, dialect: str) -> _CommittedQueries:
        scope = and_(any_of_named(dialect, _D.tenant_id, "tenants"), any_of_named(dialect, _D.name, "names"))
        return cls(_deployments_at_generation(None), _deployments_at_generation(scope, placed=True),
                   _deployments_at_generation(scope, placed=True, locking=True))


_COMMITTED_QUERIES = {dialect: _CommittedQueries.of(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def _read_committed(session: AsyncSession, scope: Collection[str] | None, *, moved_by: int = 0,
                          locking: bool = False, change: ClusterChange | None = None,
                          same_as: _Committed | None = None) -> _Committed:
    """Every deployment and placement (`scope` None), or only the scope's, and the cluster
    generation before this transaction moved it by `moved_by`: the generation read with the
    deployments (on SQLite, a move of the generation deferred just before goes with it: one
    trip); every placement in a query of its own, a scope's with its deployments (one query per
    `_CHUNK` keys). `locking` (PostgreSQL, a scope): the first of those queries moves the
    generation by `moved_by` itself and logs `change` at the new one (`_commit_locking_last`).
    `same_as` itself when the statements return the rows it was built of (a scoped commit's read
    under the lock, the same as its early read: nothing built again)."""
    scope = None if scope is None else frozenset(scope)
    queries = _COMMITTED_QUERIES[dialect_of(session)]
    reads: list[tuple[Select[Any], dict[str, Any]]] = [(queries.every, {"moved_by": moved_by})]
    if scope is not None:
        reads = []
        for chunk in _chunks(sorted(scope)):
            names = [split_deployment_key(key) for key in chunk]
            params = {"moved_by": moved_by, "tenants": sorted({t for t, _ in names}), "names": sorted({n for _, n in names})}
            first = locking and not reads
            if first:
                params.update(kind=(change or ClusterChange()).kind.value,
                              logged=list(logged_ids(change)) if change is not None else [])
            reads.append((queries.scoped_locking if first else queries.scoped, params))
    rows: list[Sequence[Any]] = []
    for query, params in reads:
        rows += await session.execute(query, params)
    if not rows and reads:
        raise MissingGeneration()
    if rows:
        generation = rows[0].cluster_generation
    else:  # an empty scope: nothing read yet
        generation = (await move_generation(session, moved_by) if locking
                      else await read_generation(session)) - moved_by
    every = list(await session.execute(_EVERY_PLACEMENT)) if scope is None else []
    if same_as is not None and (same_as.scope, same_as.generation, same_as.rows) == (scope, generation, (rows, every)):
        return same_as
    return _committed_of(scope, generation, rows, every)


def _committed_of(scope: frozenset[str] | None, generation: int, rows: list[Sequence[Any]],
                  every: list[Sequence[Any]]) -> _Committed:
    """`_read_committed`'s state of the rows its statements returned: the deployments' (`rows`,
    with their placements when scoped) and, unscoped, every placement (`every`)."""
    deployments: dict[str, Any] = {}
    placed: dict[int, Sequence[Any]] = {}  # a scope's placements by id (a deployment two chunks select: once)
    fields = 1 + len(_DEPLOYMENT_FIELDS)
    for d in rows:
        if d.id is None:
            continue
        key = deployment_key(d.tenant_id, d.name)
        if scope is None or key in scope:
            deployments.setdefault(key, _DeploymentRow(*d[1:fields]))
            if scope is not None and d.placed_id is not None:
                placed[d.placed_id] = d[fields:]
    keys_by_id = {d.id: key for key, d in deployments.items()}
    placements = every if scope is None else list(placed.values())
    committed = _Committed(scope, generation, deployments,
                           {key for key, d in deployments.items() if d.phase not in _LEAVING}, {}, [], (rows, every))
    for p in placements:  # `_PLACEMENT_FIELDS`, in order
        name = keys_by_id[p[1]]
        row = _Row(p[0], p[1], (name, p[2], p[3]), p[4], list(p[5]), p[6], p[7], p[8])
        if name in committed.live:
            committed.current[row.key] = row
        else:  # its deployment is being deleted or is quarantined: the plan no longer holds it
            committed.leaving.append(row)
    return committed


@dataclass(frozen=True)
class _SolverIds:
    """The solver deployments that stand for the stored deployments `keys` in a snapshot
    (`_solver_ids`), told by membership: the keys themselves and, when `refs` is given, every
    solver deployment whose ref names one of them."""

    keys: frozenset[str]
    refs: Mapping[str, SolverRef] | None = None

    def __contains__(self, solver_id: object) -> bool:
        if solver_id in self.keys:
            return True
        ref = None if self.refs is None else self.refs.get(solver_id)  # type: ignore[call-overload]
        return ref is not None and ref.key in self.keys


def _solver_ids(snapshot: Snapshot, keys: Collection[str]) -> _SolverIds:
    """The solver deployments that stand for the stored deployments `keys` in `snapshot`: each
    one's own and, while a rollout or a drain replaces its replicas, its outgoing revisions'
    (store/rollout.py), told by their refs (a cost of `keys`, not of the cluster). A solver
    deployment's ref names the stored deployment its id does (`SolverRef`): each of them is
    among the snapshot's documents of `keys` (`SnapshotIndex.deployments_of`, `placements_of`)."""
    refs, indices = snapshot.solver_refs, snapshot.replica_indices
    wanted = frozenset(keys)
    for key in wanted:
        ref = refs.get(key)
        if ref is None or ref.outgoing or indices.get(key, frozenset()) - set(ref.replicas.values()):
            return _SolverIds(wanted, refs)
    return _SolverIds(wanted)


def _spec_doc(snapshot: Snapshot, keys: Collection[str] | None = None,
              rows: Collection[str] | None = None, nodes: Collection[str] | None = None) -> dict[str, Any]:
    """The snapshot's problem with one deployment per stored deployment and revision, named
    `TENANT/NAME~REVISION`: what the re-check judges each shard by (the spec its replica was
    placed with); only the stored deployments `keys` and the nodes of `rows` when given, of
    those only `nodes` when given too (looked up in the snapshot's index: a cost of what they
    hold, not of the cluster)."""
    problem, index = snapshot.problem, snapshot.index
    docs = problem.get("deployments", ())
    if keys is not None:
        ids = _solver_ids(snapshot, keys)
        docs = [doc for doc in index.deployments_of(problem, keys) if doc["id"] in ids]
    specs: dict[str, dict[str, Any]] = {}
    for doc in docs:
        ref = snapshot.solver_refs.get(doc["id"])
        spec_id = outgoing_id(ref.key, ref.revision) if ref is not None else doc["id"]
        specs.setdefault(spec_id, dict(doc, id=spec_id))
    judged = {**problem, "deployments": list(specs.values()), "placements": []}
    if rows is not None:
        racks = index.racks_in(problem, rows)
        within = {r["id"] for r in racks}
        if nodes is None:
            on = index.nodes_on(problem, within)
        else:
            by_id = index.nodes_by_id(problem)
            held = {by_id[n]["rack"] for n in nodes if n in by_id} & within
            on = [n for n in index.nodes_on(problem, held) if n["id"] in nodes]
        judged.update(rows=[r for r in problem.get("rows", ()) if r["id"] in rows], racks=racks, nodes=on)
    return judged


async def _plan_changes(
    session: AsyncSession, snapshot: Snapshot, plan: Plan, committed: _Committed, stale: bool,
) -> _Changes:
    """The plan's changes to the snapshot it was solved from, in stored keys, each replica re-checked.

    Per replica: unchanged by the plan, nothing to do; changed by the plan but also by someone
    else since the snapshot, turned away (the next pass decides again); removed, removed;
    placed or moved, landed if it still fits the committed state (`recheck`). Only replicas of
    the live deployments `committed` read are considered (a scoped commit's plan speaks for no other)."""
    deployments, current, live = committed.deployments, committed.current, committed.live
    keys = snapshot.plan_keys()
    # The placements of the live ones' solver deployments (looked up in the snapshot's index;
    # none when they hold no shards in the snapshot: arrivals).
    solver_ids = _solver_ids(snapshot, live)
    held = any(snapshot.replica_indices.get(key) for key in live)
    base: dict[ShardKey, Where] = {}
    for p in snapshot.index.placements_of(snapshot.problem, live) if held else ():
        if p["deployment"] not in solver_ids:
            continue
        mapped = keys.key(p["deployment"], p["replica"], p["shard"])
        if mapped is not None:
            base[mapped[0]] = _where(p)
    changes = _Changes()
    desired: dict[ShardKey, Any] = {}
    for pl in plan.placements:
        if not committed.speaks_for(keys.name(pl.deployment)):
            continue
        mapped = keys.key(pl.deployment, pl.replica, pl.shard)
        if mapped is None:  # an outgoing replica is never placed anew
            continue
        key, revision = mapped
        if key in desired:
            raise ValueError(f"plan places shard {key} twice")
        if key[0] in live:  # else deleted since the snapshot: nothing of it is written
            desired[key] = pl
            changes.revision_of[key] = revision
    replicas: dict[ReplicaKey, set[ShardKey]] = defaultdict(set)
    for key in (*base, *desired):
        replicas[key[:2]].add(key)
    stored: dict[ReplicaKey, dict[ShardKey, _Row]] = defaultdict(dict)
    for key, row in current.items():
        if key[:2] in replicas:
            stored[key[:2]][key] = row

    landing: dict[ReplicaKey, dict[int, Where]] = {}
    for rk, shard_keys in replicas.items():
        before = {k: base[k] for k in shard_keys if k in base}
        after = {k: _where(desired[k]) for k in shard_keys if k in desired}
        if before == after:
            continue
        if {k: row.where for k, row in stored[rk].items()} != before:
            changes.requeued[rk] = (CHANGED_SINCE,)
        elif not after:
            changes.deletes += stored[rk].values()
        elif not before and changes.revision_of[min(after)] != deployments[rk[0]].template_revision:
            changes.requeued[rk] = (TEMPLATE_REPLACED,)
        else:
            landing[rk] = {k[2]: w for k, w in after.items()}
    if landing:
        rejected, doc = await _recheck(session, snapshot, committed, changes, landing, stale)
        changes.requeued.update(rejected)
        changes.nodes = node_meters(doc, {w[0] for by_shard in landing.values() for w in by_shard.values()})
    for rk, shards in landing.items():
        if rk in changes.requeued:
            continue
        for shard in shards:
            key = (*rk, shard)
            row = current.get(key)
            if row is None:
                changes.inserts[key] = desired[key]
            elif row.where != _where(desired[key]):
                changes.updates.append((row, desired[key]))
        changes.deletes += [row for k, row in stored[rk].items() if k not in desired]
    return changes


def _snapshot_racks(snapshot: Snapshot, nodes: Collection[str]) -> tuple[set[str], set[str]]:
    """The racks holding `nodes` and their rows, as `snapshot` has them (current while the
    topology and the nodes are: `_specs_since`), looked up in its index."""
    by_id = snapshot.index.nodes_by_id(snapshot.problem)
    row_of = snapshot.index.row_of(snapshot.problem)
    racks = {by_id[n]["rack"] for n in nodes if n in by_id}
    return racks, {row_of[r] for r in racks if r in row_of}


async def _read_racks(session: AsyncSession, nodes: Collection[str]) -> tuple[set[str], set[str]]:
    """The racks holding `nodes` and their rows, as committed."""
    racks: set[str] = set()
    rows: set[str] = set()
    for chunk in _chunks(sorted(set(nodes))):
        for rack, row in await session.execute(
            select(Node.rack_id, Rack.row_id).join(Rack, Rack.id == Node.rack_id)
            .where(any_of(session, Node.id, chunk)).distinct()
        ):
            racks.add(rack)
            rows.add(row)
    return racks, rows


async def _neighbours(session: AsyncSession, committed: _Committed, racks: Collection[str],
                      ) -> tuple[dict[ShardKey, tuple[int, Where]], dict[str, tuple[int, int]]]:
    """What a scoped commit's re-check reads beyond its scope on `racks` (those holding the
    nodes its landing replicas touch): the shards of live deployments outside the scope there
    ((revision, where) by key), with those deployments' (id, template revision). Every rule the
    re-check applies in full lies within one rack (recheck.py); rows and tenants come as totals
    (`_unread`)."""
    shards: dict[ShardKey, tuple[int, Where]] = {}
    outside: dict[str, tuple[int, int]] = {}
    if not racks:
        return shards, outside
    known = {d.id for d in committed.deployments.values()}
    for p in await session.execute(
        select(Deployment.id, Deployment.tenant_id, Deployment.name, Deployment.template_revision, Placement.replica,
               Placement.shard, Placement.node_id, Placement.accelerator_indices, Placement.accelerator_milli,
               Placement.revision)
        .join(Placement, Placement.deployment_id == Deployment.id).join(Node, Node.id == Placement.node_id)
        .where(any_of(session, Node.rack_id, sorted(racks)), Deployment.phase.not_in(_LEAVING))
    ):
        if p.id in known:
            continue
        key = deployment_key(p.tenant_id, p.name)
        outside[key] = (p.id, p.template_revision)
        shards[(key, p.replica, p.shard)] = (p.revision, (p.node_id, tuple(p.accelerator_indices), p.accelerator_milli))
    return shards, outside


async def _unread(session: AsyncSession, committed: _Committed, racks: Collection[str], by: tuple[Any, ...],
                  *where: Any) -> dict[tuple[Any, ...], TenantUsage]:
    """What the live shards a scoped commit did not read (outside its scope and the `racks` it
    read) and `where` selects hold, by the columns `by`: summed by the database for shards of a
    deployment's current template, one by one for those of older revisions (a rollout in flight:
    a second query, only when the first counted some)."""
    fractional = and_(Deployment.shard_accelerators == 1, Deployment.shard_accelerator_milli < 1000)
    milli = case((fractional, func.coalesce(func.nullif(Placement.accelerator_milli, 0),
                                            Deployment.shard_accelerator_milli)), else_=1000)
    held = func.json_array_length(Placement.accelerator_indices) * milli
    unread = (Deployment.phase.not_in(_LEAVING), Deployment.id.not_in(sorted(d.id for d in committed.deployments.values())),
              Node.rack_id.not_in(sorted(racks)), *where)

    def outside(query: Any) -> Any:
        return (query.join(Placement, Placement.deployment_id == Deployment.id)
                .join(Node, Node.id == Placement.node_id).join(Rack, Rack.id == Node.rack_id).where(*unread))

    current = Placement.revision == Deployment.template_revision
    held_now = case((current, held), else_=0)
    usage: dict[tuple[Any, ...], TenantUsage] = defaultdict(TenantUsage)
    older = 0
    for row in await session.execute(
        outside(select(*by, func.sum(held_now), func.sum(held_now * Deployment.shard_power_w / 1000.0),
                       func.sum(case((current, 0), else_=1)))).group_by(*by)
    ):
        usage[tuple(row[:len(by)])] += TenantUsage(float(row[-3] or 0), float(row[-2] or 0))
        older += int(row[-1] or 0)
    if not older:  # the usual case: no rollout in flight there
        return usage
    for row in await session.execute(
        outside(select(*by, Deployment.revision_specs, Placement.revision, Placement.node_id,
                       Placement.accelerator_indices, Placement.accelerator_milli)).where(~current)
    ):
        spec = (row.revision_specs or {}).get(str(row.revision))
        if spec is not None:
            usage[tuple(row[:len(by)])] += shard_usage(
                spec["shard"], (row.node_id, tuple(row.accelerator_indices), row.accelerator_milli))
    return usage


async def _read_unread(session: AsyncSession, committed: _Committed, doc: dict[str, Any],
                       landing: dict[ReplicaKey, dict[int, Where]], racks: set[str], rows: set[str]) -> Unread:
    """The totals a scoped commit's re-check needs of what it did not read: what the landing
    replicas' tenants with a quota hold, and what the shards on the other racks of the touched
    rows with a power budget draw."""
    quota = {t["id"] for t in doc["tenants"] if capped(t)} & {committed.deployments[rk[0]].tenant_id for rk in landing}
    budgeted = {r["id"] for r in doc["rows"] if r["id"] in rows and r.get("power_budget_w") is not None}
    tenants: dict[str, TenantUsage] = {}
    if quota:
        held = await _unread(session, committed, racks, (Deployment.tenant_id,),
                             any_of(session, Deployment.tenant_id, sorted(quota)))
        tenants = {tenant: usage for (tenant,), usage in held.items()}
    by_row: dict[str, dict[str, float]] = defaultdict(dict)
    if budgeted:
        drawn = await _unread(session, committed, racks, (Rack.row_id, Deployment.tenant_id),
                              any_of(session, Rack.row_id, sorted(budgeted)))
        for (row, tenant), usage in drawn.items():
            by_row[row][tenant] = usage.power_w
    return Unread(tenants, by_row)


@dataclass(frozen=True)
class _Since:
    """What the change log says changed since a stale commit's snapshot, when the re-check may
    still judge by that snapshot's document (`_specs_since`)."""

    # Deployments being deleted since (their shards leave); None: a deletion that names none.
    deleted: frozenset[str] | None
    placed: bool  # another commit changed shards of deployments the snapshot knows


async def _specs_since(session: AsyncSession, snapshot: Snapshot, generation: int) -> _Since | None:
    """Whether what the re-check judges by (topology, nodes, tenants, the specs of deployments)
    is as `snapshot` has it at `generation`, said by the change log in between: only deletions
    (a deployment being deleted is judged by nothing: its shards leave) and placements changed
    of deployments the snapshot knows (shards released, failures reported, another controller's
    plan; the shards themselves are read under the lock); None: something else changed. One
    query instead of the six that read the document again; the usual staleness under load is
    deletions."""
    since = await read_changes_since(session, snapshot.generation, generation=generation)
    if not since.complete:
        return None
    known = snapshot.deployment_ids
    deleted: set[str] | None = set()
    placed = False
    for kind, name in (change for logged in since.changes.values() for change in logged):
        if kind is ChangeKind.DEPLOYMENT_DELETED:
            deleted = None if deleted is None or name is None else deleted | {name}
        elif kind is ChangeKind.PLACEMENTS and name is not None and name in known:
            placed = True
        else:
            return None
    return _Since(None if deleted is None else frozenset(deleted), placed)


def _snapshot_neighbours(snapshot: Snapshot, committed: _Committed, racks: Collection[str], since: _Since | None,
                         nodes: Collection[str] | None = None,
                         ) -> tuple[dict[ShardKey, tuple[int, Where]], dict[str, tuple[int, int]]] | None:
    """`_neighbours` from `snapshot` instead of the database, for a commit whose snapshot is
    current (`since` None) or stale by deletions alone (`since.deleted`: their shards are left
    out, as the database's live shards leave them out): the snapshot holds every committed shard
    of the deployments outside the commit's scope. Only those on `nodes` of the racks when given
    (`_judged_alone`). None when it cannot tell: another commit changed shards since, or the
    snapshot left out shards still stored there (`Snapshot.released`). No statement under the
    writer's lock, and a cost of the snapshot's placements there (its index), not of a join of
    every placement on the racks (a 64-shard gang touches dozens)."""
    if not racks:
        return {}, {}
    if since is not None and (since.placed or since.deleted is None):
        return None
    problem, index = snapshot.problem, snapshot.index
    on = {n["id"] for n in index.nodes_on(problem, racks)}
    if nodes is not None:
        on.intersection_update(nodes)
    if any(where[0] in on for where in snapshot.released.values()):
        return None
    gone = frozenset() if since is None or since.deleted is None else since.deleted
    keys = snapshot.plan_keys()
    shards: dict[ShardKey, tuple[int, Where]] = {}
    outside: dict[str, tuple[int, int]] = {}
    for p in index.placements_on(problem, on):
        mapped = keys.key(p["deployment"], p["replica"], p["shard"])
        if mapped is None:
            return None
        key, revision = mapped
        if committed.speaks_for(key[0]) or key[0] in committed.deployments or key[0] in gone:
            continue
        if key[0] not in outside:
            ref = snapshot.solver_refs.get(key[0])
            template = ref.revision if ref is not None and not ref.outgoing else revision
            outside[key[0]] = (snapshot.deployment_ids.get(key[0], 0), template)
        shards[key] = (revision, _where(p))
    return shards, outside


def _judged_alone(snapshot: Snapshot, committed: _Committed, landing: Mapping[ReplicaKey, Mapping[int, Where]],
                  racks: Collection[str], rows: Collection[str]) -> bool:
    """Whether the re-check judges the nodes the landing replicas touch alone and needs no totals
    of what lies around them: no rule of a rack's scope applies on `racks`
    (`recheck.rack_rules_apply`, as the re-check itself tells from the same documents), no row of
    `rows` has a power budget and no landing replica's tenant a quota. A scoped commit then takes
    the shards beside its scope on those nodes alone, else on every node of `racks`."""
    problem, index = snapshot.problem, snapshot.index
    tenants = problem.get("tenants", ())
    landing_tenants = {committed.deployments[rk[0]].tenant_id for rk in landing}
    return not (rack_rules_apply([r for r in index.racks_in(problem, rows) if r["id"] in racks], tenants)
                or any(r.get("power_budget_w") is not None for r in problem.get("rows", ()) if r["id"] in rows)
                or any(capped(t) for t in tenants if t["id"] in landing_tenants))


# The largest re-check run on the event loop (`recheck_work`): ~8 ms of CPU. Its cost is ~1 us a
# node and a shard of the document it judges and ~60 times as much a landing replica (measured:
# an unscoped commit's re-check, 12-20 ms of CPU at 4,096 nodes and 11,058 shards, 51-63 ms at
# 16,384 and 44,114 for 1-32 landing replicas, 0.76 s for all 19,125; a scoped one's, 1-5 ms;
# docs/benchmarks.md, issue 8, `rv-gil`).
RECHECK_ON_LOOP_MAX = 8_000
RECHECK_REPLICA_WORK = 60


def recheck_work(doc: Mapping[str, Any], placed: Collection[Any], wanted: Collection[Any]) -> int:
    """What a re-check costs, in the units of `RECHECK_ON_LOOP_MAX`: the document's nodes, the
    committed shards and the landing replicas (`RECHECK_REPLICA_WORK` each)."""
    return len(doc.get("nodes", ())) + len(placed) + RECHECK_REPLICA_WORK * len(wanted)


async def _recheck(
    session: AsyncSession, snapshot: Snapshot, committed: _Committed, changes: _Changes,
    landing: dict[ReplicaKey, dict[int, Where]], stale: bool,
) -> tuple[dict[ReplicaKey, tuple[str, ...]], dict[str, Any]]:
    """`recheck` of the landing replicas against the committed state (on the event loop when it
    is small, else in a worker thread: `RECHECK_ON_LOOP_MAX`); shards
    are named by the spec of their revision (`_spec_doc`). The specs and nodes come from the
    snapshot, or are read again when it is stale (a node cordoned, a contract changed since).
    A scoped commit adds the shards outside its scope on the racks the landing replicas touch
    (on the nodes they touch, when the re-check judges those alone: `_judged_alone`), and the
    totals of the rest that row power budgets and tenant quotas need (`Unread`).
    Returns the replicas turned away (why) and the document judged by (its nodes are current)."""
    deployments, removed = committed.deployments, {row.key for row in changes.deletes}
    shards = {k: (row.revision, row.where) for k, row in committed.current.items() if k not in removed}
    template = {key: d.template_revision for key, d in deployments.items()}
    racks: set[str] = set()
    rows: set[str] | None = None
    ids: set[int] | None = None
    touched: set[str] = set()
    alone = False
    since = await _specs_since(session, snapshot, committed.generation) if stale else None
    current = not stale or since is not None  # the snapshot's document
    if committed.scope is not None:
        touched = {w[0] for s in landing.values() for w in s.values()}
        racks, rows = _snapshot_racks(snapshot, touched) if current else await _read_racks(session, touched)
        alone = current and _judged_alone(snapshot, committed, landing, racks, rows)
        near = _snapshot_neighbours(snapshot, committed, racks, since, touched if alone else None) if current else None
        outside, others = near if near is not None else await _neighbours(session, committed, racks)
        shards.update(outside)
        template.update((key, revision) for key, (_, revision) in others.items())
        ids = {d.id for d in deployments.values()} | {i for i, _ in others.values()}
    if not current:
        doc = await load_spec_doc(session, within_rows=rows, deployment_ids=ids)
    else:
        # Judged alone, the nodes the landing replicas touch are all of the rows it needs.
        doc = _spec_doc(snapshot, None if committed.scope is None else set(template), rows, touched if alone else None)
    specs = {d["id"] for d in doc["deployments"]}
    unread = Unread() if rows is None else await _read_unread(session, committed, doc, landing, racks, rows)

    named: dict[tuple[str, int], str] = {}  # each deployment's shards share one or two revisions

    def spec(name: str, revision: int) -> str:
        found = named.get((name, revision))
        if found is None:
            # A deployment without a solver ref in its snapshot (a cache that learnt it) is its own spec.
            found = next((candidate for candidate in (outgoing_id(name, revision), outgoing_id(name, template[name]),
                                                      name) if candidate in specs),
                         outgoing_id(name, revision))  # else judged as an unknown deployment
            named[(name, revision)] = found
        return found

    placed = {(spec(k[0], revision), k[1], k[2]): where for k, (revision, where) in shards.items()}
    wanted = {(spec(rk[0], changes.revision_of[(*rk, min(by_shard))]), rk[1]): by_shard
              for rk, by_shard in landing.items()}
    # A small re-check on the loop, not a worker thread: Python holding the GIL all along (4 ms of
    # CPU a call at the median, 17 ms at most, saturated at 4,096 nodes), which a worker holds just
    # as long and the loop waits for just the same, after a hand-over each way (there 12.5 ms of
    # wall time a call for 3.6 ms of CPU: docs/benchmarks.md, issue 8, `gilthreads`). A large one
    # (an unscoped commit's, which judges the whole cluster) in a worker thread, where the loop
    # still gets its turns: `RECHECK_ON_LOOP_MAX`.
    if recheck_work(doc, placed, wanted) <= RECHECK_ON_LOOP_MAX:
        rejected = recheck(doc, placed, wanted, unread)
    else:
        rejected = await asyncio.to_thread(recheck, doc, placed, wanted, unread)
    return {(stored_key(spec_id), replica): why for (spec_id, replica), why in rejected.items()}, doc


@dataclass(frozen=True)
class _Checked:
    """A plan's changes against the committed state as read at one generation (`_check`)."""

    read: _Committed  # as read
    committed: _Committed  # without the shards released (`released`)
    # Shards the snapshot left out (store/snapshot.py `released`) that are still there: removed.
    released: list[_Row]
    changes: _Changes


async def _check(session: AsyncSession, snapshot: Snapshot, plan: Plan, read: _Committed) -> _Checked:
    """The plan's changes (each replica re-checked) against `read`. What it depends on beyond
    `read` (the snapshot's or the database's topology, nodes, tenants, specs, the shards of other
    deployments and the change log) changes only with the cluster generation, which `read` holds
    (every writer of those bumps it: module docstring): checked again against a read with the same
    rows at the same generation, it gives the same changes."""
    current = read.current
    released = [current[k] for k, where in snapshot.released.items() if k in current and current[k].where == where]
    committed = read
    if released:
        gone = {row.key for row in released}
        committed = replace(read, current={k: row for k, row in current.items() if k not in gone})
    changes = await _plan_changes(session, snapshot, plan, committed, read.generation != snapshot.generation)
    return _Checked(read, committed, released, changes)


def _no_lap(_step: str) -> None:
    pass


async def commit_plan(
    session: AsyncSession, snapshot: Snapshot, plan: Plan, *, scope: Collection[str] | None = None,
    actor: str = "controller", now: datetime | None = None, laps: Callable[[str], None] | None = None,
) -> CommitResult:
    """Apply `plan` (solved from `snapshot`) in the caller's transaction; the caller commits.

    What the plan changes relative to its snapshot is written where it still holds: a replica
    that no longer fits the committed state is left out and reported in `requeued` (see the
    module docstring). Raises ValueError for a plan that places one shard twice.

    `scope` (stored deployment keys `TENANT/NAME`; None: every deployment): the plan speaks only
    for these deployments, and the commit costs the scope, not the cluster. Name every
    deployment whose replicas the plan places, moves, preempts or removes (victims included).
    Replicas of other deployments are neither changed nor taken as removed by the plan (the plan
    may name them or not: they are ignored); the commit reads them only where the re-check needs
    them, on the rows its landing replicas touch. A deployment being deleted (or quarantined)
    loses its shards only when in scope, and its row goes when in scope and in
    `snapshot.deleting`, as an unscoped commit does for all of them; the others wait for a commit
    that names them (an unscoped pass does). Scoped or not, the same plan lands the same changes
    for the scope's deployments (tests/store/test_commit_scope.py).

    `laps(step)` is told as each step ends (a caller's timings): `commit_early` (a scoped
    commit's read and check before the lock), `commit_turn` (on SQLite the wait for the writer's
    turn; the writer is held from its end to the caller's commit), `commit_read` (the committed
    state), `commit_check` (the plan's changes, re-checked: nothing when the early check stands);
    the writes follow.
    """
    lap = laps or _no_lap
    # The generation row's write lock (PostgreSQL row lock, SQLite write lock) to the end of the
    # caller's transaction: commits serialise here, so each plan is checked against a state no
    # other commit changes under it. A commit that will change placements bumps the generation in
    # the same statement; one that changes nothing leaves it (its watchers are not woken), a
    # wrong guess is put right before the end (nobody sees the row before the commit).
    scope = None if scope is None else frozenset(scope)
    bumped = _will_change(snapshot, plan, scope)
    # A scoped commit reads its rows and checks the plan against them before it takes the lock,
    # and again under the lock only when the rows read there differ (`_check`): the writer is
    # held for the reads and the writes. An unscoped one (the whole cluster) reads once, under it.
    # On PostgreSQL as on SQLite: there the early read is two statements more, and the generation
    # row's lock (every writer that bumps the generation waits for it) is held ~60 % shorter
    # (measured: docs/benchmarks.md, issue 8, night 2, `tidy2`); shorter still when it is taken
    # after the writes (`_commit_locking_last`).
    early = None
    if scope is not None:
        early = await _check(session, snapshot, plan, await _read_committed(session, scope))
        lap("commit_early")
        if dialect_of(session) == POSTGRESQL:
            landed = await _commit_locking_last(session, snapshot, plan, early, actor=actor, now=now or utcnow(), lap=lap)
            if landed is not None:
                return landed
    # The generation's row before the writes: under the generation writers' lock, exclusive
    # (PostgreSQL's lock order: store/changes.py).
    await moves_generation_first(session)
    now = now or utcnow()
    settled = _ReportsSettled(session)
    while True:
        await settled.begin()
        with deferred_writes():  # on SQLite the generation's UPDATE goes with the read that follows it
            await move_generation_unread(session, 1 if bumped else 0)
            lap("commit_turn")
            # Current state (read under the generation lock): every deployment and placement, or the scope's.
            read = await _read_committed(session, scope, moved_by=int(bumped),
                                         same_as=None if early is None else early.read)
        lap("commit_read")
        checked = early if early is not None and early.read is read else await _check(session, snapshot, plan, read)
        lap("commit_check")
        # Write: placements, deployments, nodes, the cluster generation, events. On SQLite the writes
        # whose results nothing reads ride with the next statement that returns rows, or the caller's
        # commit (`sqlite_driver.deferred_writes`: four trips to SQLite's thread under the writer
        # instead of thirteen): the commit fails or commits whole.
        with deferred_writes():
            landed = await _land(session, snapshot, plan, checked, stale=read.generation != snapshot.generation,
                                 generation=read.generation + int(bumped), bumped=bumped, actor=actor, now=now)
            if await settled.stands(landed):
                await audit.append(session, landed.audited, at=now)
                return landed.result
        lap("commit_undone")


# A plan commit's savepoint on PostgreSQL (`_commit_locking_last`).
_SAVEPOINT = "maia_plan_commit"
# The savepoint of a PostgreSQL commit that takes the lock first (`_ReportsSettled`).
_READ_SAVEPOINT = "maia_plan_read"
_PLACED_PHASES = select(_P.deployment_id, _P.replica, _P.shard, _P.phase).where(_P.deployment_id == func.any(
    bindparam("ids", type_=ARRAY(Integer))))
# The shards of some deployments locked (a report flush writes a deployment's shards before its
# row: locking the shards keeps the order of the locks a flush takes), with the shards a former
# try deleted or moved (`written`), all in ascending id in one statement (the lock order):
# `FOR UPDATE`, what a DELETE takes.
_LOCK_SHARDS = (select(_P.id).where(or_(_P.deployment_id == func.any(bindparam("ids", type_=ARRAY(Integer))),
                                        _P.id == func.any(bindparam("written", type_=ARRAY(Integer)))))
                .order_by(_P.id).with_for_update())


class _ReportsSettled:
    """PostgreSQL: what makes a commit that takes the generation's lock first (before its read)
    write its deployments' phases from their shards as committed.

    Agents' reports (the hub's flush) change shard phases, and the phases of their deployments, under
    no generation lock: a report landing between this commit's read and its write of a deployment's
    row was written over, with a phase judged from the shards as read (issue 8, `pgcost`'s leftover).
    Once written, the rows are its own: a report on their shards waits for them (the flush locks a
    deployment before it writes its phase) and then reads what this commit wrote. So after its
    writes the commit reads again the shards of the deployments it wrote (one statement); when one
    of them is not as the commit judged its phase by (a report landed in between), what it wrote is
    undone (to a savepoint taken with its read) and it reads again, those deployments' shards
    locked first (a flush writes a deployment's shards before it locks its row, so no report on
    them lands after that read, and the two take their locks in one order), with the shards it
    deleted or moved, all in ascending id (taken after those, one of a lower id waited for a
    flush that held it and waited for one of them: a deadlock). Only a plan commit adds
    shards, and this one holds the generation writers' lock exclusive. SQLite's writer lock keeps
    reports out already."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._postgres = dialect_of(session) == POSTGRESQL
        self._savepoint: pg_driver.Savepoint | None = None
        self._locked: set[int] = set()  # deployments locked before the read
        self._written: set[int] = set()  # placements a former try deleted or moved, locked with them

    async def begin(self) -> None:
        """Before the read: the savepoint (sent with the transaction's BEGIN when it has not begun:
        no round trip), and the shards of the deployments reports moved under a former try."""
        if not self._postgres:
            return
        self._savepoint = pg_driver.Savepoint(self._session, _READ_SAVEPOINT)
        await self._savepoint.open()
        if self._locked:
            await self._session.execute(_LOCK_SHARDS, {"ids": sorted(self._locked), "written": sorted(self._written)})

    async def stands(self, landed: _Landed) -> bool:
        """Whether the deployments `landed` wrote have the shards it judged their phases by; if
        not, its writes are undone and the next `begin` locks those deployments' shards."""
        savepoint = self._savepoint
        if savepoint is None or not landed.judged_by:
            return True
        placed: dict[int, set[tuple[int, int, ShardPhase]]] = defaultdict(set)
        for deployment_id, replica, shard, phase in await self._session.execute(
                _PLACED_PHASES, {"ids": sorted(landed.judged_by)}):
            placed[deployment_id].add((replica, shard, ShardPhase(phase)))
        moved = {i for i, judged in landed.judged_by.items() if placed.get(i, set()) != judged}
        if not moved:
            savepoint.close()
            return True
        await savepoint.rollback()
        self._locked |= moved
        # The next try writes these again (reports move no shard, and the writers that do wait
        # for this commit's exclusive lock): taken before its read with the others, in ascending
        # id, never after shards of a higher id (a flush holding one waited for those).
        self._written |= landed.shards_written
        return False


async def _commit_locking_last(session: AsyncSession, snapshot: Snapshot, plan: Plan, early: _Checked, *,
                               actor: str, now: datetime, lap: Callable[[str], None]) -> CommitResult | None:
    """PostgreSQL, a scoped commit checked early: its writes first, the generation's lock last.

    The plan's changes as checked against the early read are written (the change log at the
    generation they will have), then one statement moves the generation (its row lock, to the
    commit) and reads the scope's rows again. When the generation was the early read's (no writer
    that bumps it committed since) and the rows are the early read's with this commit's writes on
    them (no report changed them since), the check stands as under the lock: the audit entries
    follow and the commit is done, the lock held for two statements and the COMMIT rather than
    for every write (a delete or submit batch's generation bump waited for it: docs/benchmarks.md,
    `pg10`, `pgcost`). Else what it wrote is rolled back (to a savepoint sent with the BEGIN) and
    None returned: the caller commits as before, the lock first."""
    savepoint = pg_driver.Savepoint(session, _SAVEPOINT)
    await savepoint.open()
    # The generation writers' lock, shared, after the savepoint: undone with it when the commit
    # falls back to taking it exclusive (PostgreSQL's lock order: store/changes.py).
    await will_move_generation(session)
    try:
        try:
            landed = await _land(session, snapshot, plan, early, stale=early.read.generation != snapshot.generation,
                                 generation=None, bumped=False, actor=actor, now=now)
        except (StaleDataError, IntegrityError):
            # A shard it moves was removed since the early read (a node's shards released), or one
            # it places was placed meanwhile by another controller's commit (two passes at once
            # around a leader change: its INSERT waited for that row, then met its unique key).
            await savepoint.rollback()
            lap("commit_undone")
            return None
        lap("commit_write")
        moved = int(landed.change is not None)
        read = await _read_committed(session, early.read.scope, moved_by=moved, locking=True, change=landed.change)
        lap("commit_turn")
    finally:
        savepoint.close()
    if _rows(read) == landed.rows and await _deletions_alone(session, early.read.generation, read.generation,
                                                             early.read.scope or frozenset()):
        generation = read.generation + moved
        await prune_changes(session, generation)
        await audit.append(session, landed.audited, at=now)
        return replace(landed.result, generation=generation, stale=read.generation != snapshot.generation)
    await savepoint.rollback()
    lap("commit_undone")
    return None


async def _deletions_alone(session: AsyncSession, checked: int, generation: int, scope: frozenset[str]) -> bool:
    """Whether the cluster generation moved from `checked` (a commit's early read) to `generation`
    (under the lock) by deletions alone (deployments marked DELETING, all the usual moves under
    load: each delete batch's) of deployments outside `scope` (the commit's), which leave a check
    made at `checked` standing: their shards stay stored until a commit removes them, and leaving
    only frees what they held. A deletion of one the commit speaks for (or of unnamed ones) does
    not: the commit's UPDATE of that deployment's row wrote its phase over DELETING, so its rows
    read as written. One statement, only when it moved."""
    if generation == checked:
        return True
    since = await read_changes_since(session, checked, generation=generation)
    return since.complete and all(kind is ChangeKind.DEPLOYMENT_DELETED and key is not None and key not in scope
                                  for logged in since.changes.values() for kind, key in logged)


_PlacedRows = dict[ShardKey, tuple[str, tuple[int, ...], int | None, ShardPhase, int]]


def _rows(committed: _Committed) -> tuple[dict[str, Any], _PlacedRows]:
    """What a commit compares of a read: its deployments' rows and their placements (by key,
    without their ids: a row written by this transaction has one it has not read)."""
    placed = {row.key: (row.node, tuple(row.indices), row.milli, row.phase, row.revision)
              for row in (*committed.current.values(), *committed.leaving)}
    return dict(committed.deployments), placed


@dataclass(frozen=True)
class _Landed:
    """A plan's changes as written (`_land`): the result, the audit entries still to append, what
    it changed for the change log (logged already by a commit that holds the lock), and for one
    that takes the lock last the rows its read should find after its writes (`_rows`)."""

    result: CommitResult
    audited: list[audit.AuditRecord]
    change: ClusterChange | None  # what moves the generation (placements), logged; None: nothing
    rows: tuple[dict[str, Any], _PlacedRows]
    # The deployments whose rows it wrote (by id), each with the shards (replica, shard, phase) its
    # phase was judged by: their placements as the commit leaves them (`_ReportsSettled`).
    judged_by: dict[int, frozenset[tuple[int, int, ShardPhase]]] = field(default_factory=dict)
    shards_written: frozenset[int] = frozenset()  # the placements (ids) it deleted or moved


async def _land(session: AsyncSession, snapshot: Snapshot, plan: Plan, checked: _Checked, *, stale: bool,
                generation: int | None, bumped: bool, actor: str, now: datetime) -> _Landed:
    """Write `plan`'s changes as `checked` found them (placements, meters, deployments, nodes,
    events); `generation`: the cluster generation after the commit, its row locked and moved by
    `bumped` already (a wrong guess put right here), and the change logged at it; None: the
    caller moves it last, by one when the commit changes placements, and logs the change
    (`_commit_locking_last`)."""
    committed, released, changes = checked.committed, checked.released, checked.changes
    deployments, live, current = committed.deployments, committed.live, committed.current
    inserts, updates = changes.inserts, changes.updates
    deletes = changes.deletes + committed.leaving + released
    deleted_keys = {row.key for row in deletes}
    final: dict[ShardKey, str] = {k: row.node for k, row in current.items() if k not in deleted_keys}
    final.update((row.key, pl.node) for row, pl in updates)
    final.update((key, pl.node) for key, pl in inserts.items())

    changed_nodes: set[str] = {pl.node for pl in inserts.values()}
    changed_nodes.update(row.node for row in deletes)
    for row, pl in updates:
        changed_nodes.update((row.node, pl.node))
    changed_deployments: set[str] = {key[0] for key in inserts}
    changed_deployments.update(row.key[0] for row in deletes if row.key[0] in live)
    changed_deployments.update(row.key[0] for row, _ in updates)

    # Deployments the plan knows (in its snapshot): generation, phase (the rule of domain/phases
    # over the shards written), reasons. One submitted after the snapshot is left to the next pass.
    keys = snapshot.plan_keys()
    planned = {name for name in live if name in snapshot.deployment_ids}  # a cost of the scope, not of the cluster
    new_generation = {
        name: deployments[name].generation + (1 if name in changed_deployments else 0) for name in live
    }
    shard_phases: dict[str, list[tuple[int, ShardPhase]]] = defaultdict(list)
    judged_by: dict[str, set[tuple[int, int, ShardPhase]]] = defaultdict(set)
    sizes: dict[str, dict[int, int]] = defaultdict(dict)  # shards per replica, where not the deployment's
    restarted = set(inserts) | {row.key for row, _ in updates}  # new and moved shards start over as ASSIGNED
    for key in final:
        row = current.get(key)
        shard_phase = ShardPhase.ASSIGNED if key in restarted or row is None else row.phase
        shard_phases[key[0]].append((key[1], shard_phase))
        judged_by[key[0]].add((key[1], key[2], shard_phase))
        d = deployments[key[0]]
        revision = changes.revision_of[key] if row is None else row.revision
        if revision != d.template_revision:
            sizes[key[0]][key[1]] = shards_of(d, revision)
    unplaced = {keys.name(u.deployment): u for u in plan.unplaced
                if keys.name(u.deployment) in planned and not keys.is_outgoing(u.deployment)}
    preempted: dict[str, set[int]] = defaultdict(set)
    for victim in plan.preempted:
        replica = keys.replica(victim.deployment, victim.replica)
        if replica is not None:
            preempted[keys.name(victim.deployment)].add(replica)
    deployment_updates: list[dict[str, Any]] = []
    updated_deployments: set[str] = set()
    reasons_changed: set[str] = set()
    first_placed: dict[str, float] = {}
    for name in sorted(planned | changed_deployments):
        d = deployments[name]
        reasons = _reason_dicts(unplaced[name].reasons) if name in unplaced else []
        if name not in planned:
            reasons = d.reasons or []
        elif name in preempted:  # told why, and kept while what was preempted waits to be placed again
            reasons = [preempted_reason(sorted(preempted[name]))] + reasons
        elif name in unplaced:
            reasons = [r for r in d.reasons or () if r.get("code") == PREEMPTED][:1] + reasons
        failure = failure_reasons(d.reasons or ())  # kept until it runs again (domain/restarts.py)
        counts = replica_counts(d.shards_per_replica, shard_phases[name], sizes=sizes.get(name))
        phase = DeploymentPhase(deployment_phase(d.replicas, counts, failed=d.phase is DeploymentPhase.FAILED,
                                                 failing=bool(failure), min_replicas=d.min_replicas))
        if name in planned and phase is not DeploymentPhase.RUNNING:
            reasons = failure + reasons
        if reasons != (d.reasons or []):
            reasons_changed.add(name)
        if d.generation == 0 and d.phase is DeploymentPhase.PENDING and phase is not DeploymentPhase.PENDING:
            first_placed[name] = _seconds_between(d.created_at, now)
        if name in changed_deployments or phase is not d.phase or name in reasons_changed:
            deployment_updates.append(
                {"b_id": d.id, "phase": phase, "reasons": reasons, "generation": new_generation[name],
                 "updated_at": now}
            )
            if name not in changed_deployments:
                updated_deployments.add(name)

    deleted_deployments = {name for name, d in deployments.items()
                           if d.phase is DeploymentPhase.DELETING and name in snapshot.deleting}
    written = await _write(session, changes=changes, deletes=deletes, deployments=deployments,
                           new_generation=new_generation, deployment_updates=deployment_updates,
                           changed_nodes=changed_nodes, changed_deployments=changed_deployments,
                           deleted_deployments=deleted_deployments, now=now)
    # What it touched, as written: every deployment whose placement rows it deleted, moved or
    # inserted (those of deployments being deleted or quarantined among them, which no plan holds:
    # `_Committed.leaving`), or whose row it deleted. The generation moves when it touched one, and
    # the change log names them: another controller's cache (HA) and the isolation watchdog's view
    # read those deployments again (`warm.catch_up`, `watchdog`; this controller's cache knows
    # them). One touching very many names none: they read the whole cluster, which then costs little more.
    touched = written | deleted_deployments
    moved = bool(touched)
    change = ClusterChange.placements(touched if len(touched) <= LOGGED_DEPLOYMENTS_MAX else ()) if moved else None
    if generation is not None:
        generation = await _move_to(session, generation, bumped, moved)
        if change is not None:
            await log_change(session, generation, change)
    events = _events(current, final, deletes, updates, preempted, unplaced, reasons_changed, deleted_deployments,
                     changes.requeued)
    if events:
        await session.execute(_INSERT_EVENT, [{**e, "actor": actor, "at": now} for e in events])
    tenants = {name: d.tenant_id for name, d in deployments.items()}
    result = CommitResult(
        changed_nodes=changed_nodes,
        changed_deployments=touched,
        generation=checked.read.generation + int(moved) if generation is None else generation,
        updated_deployments=updated_deployments,
        deleted_deployments=deleted_deployments,
        first_placed_after_s=first_placed,
        stale=stale,
        requeued=dict(changes.requeued),
        shards={**{row.key: None for row in deletes}, **{row.key: _where(pl) for row, pl in updates},
                **{key: _where(pl) for key, pl in inserts.items()}},
    )
    written = {update_["b_id"] for update_ in deployment_updates}
    return _Landed(result, _decision_records(events, tenants, actor), change,
                   _as_written(checked.read, deletes, updates, inserts, changes.revision_of, deployment_updates,
                               deleted_deployments) if generation is None else ({}, {}),
                   {d.id: frozenset(judged_by[name]) for name, d in deployments.items() if d.id in written},
                   frozenset(row.id for row in deletes) | frozenset(row.id for row, _ in updates))


async def _move_to(session: AsyncSession, generation: int, bumped: bool, moved: bool) -> int:
    """The generation after a commit that moved it by `bumped` when it took the lock and changes
    placements or not (`moved`): a wrong guess put right (nobody sees the row before the commit)."""
    return generation if moved == bumped else await move_generation(session, -1 if bumped else 1)


def _as_written(read: _Committed, deletes: list[_Row], updates: list[tuple[_Row, Any]], inserts: dict[ShardKey, Any],
                revision_of: dict[ShardKey, int], deployment_updates: list[dict[str, Any]],
                deleted: set[str]) -> tuple[dict[str, Any], _PlacedRows]:
    """`_rows` of the scope as `read`, once a commit's writes are on it."""
    deployments, placed = _rows(read)
    for row in deletes:
        placed.pop(row.key, None)
    for row, pl in updates:
        placed[row.key] = (*_where(pl), ShardPhase.ASSIGNED, row.revision)
    for key, pl in inserts.items():
        placed[key] = (*_where(pl), ShardPhase.ASSIGNED, revision_of[key])
    by_id = {d.id: key for key, d in deployments.items()}
    for update_ in deployment_updates:
        key = by_id[update_["b_id"]]
        deployments[key] = deployments[key]._replace(phase=update_["phase"], reasons=update_["reasons"],
                                                     generation=update_["generation"])
    for key in deleted:
        deployments.pop(key, None)
    return deployments, placed


# A deployment's phase, reasons and generation as a plan commit writes them: a Core executemany
# (its row count is not read: the ORM's bulk UPDATE checks it, and so could not be deferred). The
# rows were read under the generation lock in this transaction, and only a plan commit deletes
# a schedulable deployment's row.
_UPDATE_DEPLOYMENT = rowcount_unread(
    update(_DEPLOYMENTS).where(_DEPLOYMENTS.c.id == bindparam("b_id")).values(
        phase=bindparam("phase"), reasons=bindparam("reasons"), generation=bindparam("generation"),
        updated_at=bindparam("updated_at")))


@dataclass(frozen=True)
class _Writes:
    """A plan commit's statements over lists of rows for one dialect, built once (each list
    named `ids`): placements and deployments deleted, nodes whose assignment generation moves;
    on PostgreSQL, placements and deployments locked. Their row counts are not read
    (`rowcount_unread`).

    PostgreSQL locks the rows of each table in ascending id (the lock order: store/changes.py): a
    report flush locks them so (`repo.write_reported_shards`, `deployments_named`,
    `write_heartbeats`), and a commit that took two rows in the other order than the flush
    deadlocked with it (PostgreSQL aborted one after `deadlock_timeout`). A DELETE or UPDATE over
    a list takes its rows in the order its plan scans them (an index's or the heap's), so theirs
    take them in a subquery first, `ORDER BY id` (`FOR UPDATE`: what a DELETE takes; `FOR NO KEY
    UPDATE`: an UPDATE of other columns); `lock_*` take the rows of a commit that deletes some and
    updates others of one table, before it writes either."""

    delete_placements: Any
    delete_deployments: Any
    bump_nodes: Any
    lock_placements: Any = None
    lock_deployments: Any = None

    @classmethod
    def of(cls, dialect: str) -> _Writes:
        def unread(statement: Any) -> Any:
            return rowcount_unread(statement)

        def listed_ids(table: Any, *, deletes: bool) -> ColumnElement[bool]:
            return any_of_named_in_order(dialect, table.c.id, "ids", deletes=deletes)

        nodes = Node.__table__
        return cls(unread(delete(_PLACEMENTS).where(listed_ids(_PLACEMENTS, deletes=True))),
                   unread(delete(_DEPLOYMENTS).where(listed_ids(_DEPLOYMENTS, deletes=True))),
                   unread(update(nodes).where(listed_ids(nodes, deletes=False))
                          .values(assignment_generation=nodes.c.assignment_generation + 1)),
                   *((_locked_in_order(_PLACEMENTS, deletes=True), _locked_in_order(_DEPLOYMENTS, deletes=True))
                     if dialect == POSTGRESQL else ()))


def _locked_in_order(table: Any, *, deletes: bool) -> Select[Any]:
    """PostgreSQL: the rows of `table` whose ids the parameter `ids` lists, locked in ascending id
    (a text id in code point order, as Python sorts it: `repo.write_heartbeats`; the database's
    collation may order it otherwise)."""
    return locked_in_order(any_of_named(POSTGRESQL, table.c.id, "ids"), table.c.id, deletes=deletes)


_WRITES = {dialect: _Writes.of(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def _write(
    session: AsyncSession, *, changes: _Changes, deletes: list[_Row], deployments: dict[str, Any],
    new_generation: dict[str, int], deployment_updates: list[dict[str, Any]], changed_nodes: set[str],
    changed_deployments: set[str], deleted_deployments: set[str], now: datetime,
) -> set[str]:
    """A plan commit's placements, usage meters, deployments and nodes. Keyword-only: three sets
    of names in a row are easily handed over in the wrong order. Returns the deployments (keys)
    whose placement rows it deleted, moved or inserted, taken from the very rows it wrote: the
    change log names every one (`_land`), whatever path put a row among them."""
    inserts = changes.inserts
    updates = sorted(changes.updates, key=lambda update_: update_[0].id)  # each table's rows in ascending id
    dialect = dialect_of(session)
    writes = _WRITES[dialect]
    deleted_ids = sorted(deployments[name].id for name in deleted_deployments)
    await _lock_deleted_and_updated(session, writes.lock_placements, [row.id for row in deletes],
                                    [row.id for row, _ in updates])
    for chunk in _chunks(sorted(row.id for row in deletes)):
        await session.execute(writes.delete_placements, {"ids": listed(dialect, chunk)})
    if updates:  # the ORM's bulk UPDATE: its row count is checked (a placement deleted since fails the commit)
        await session.execute(
            update(Placement),
            [
                {
                    "id": row.id,
                    "node_id": pl.node,
                    "accelerator_indices": list(pl.accelerator_indices),
                    "accelerator_milli": pl.accelerator_milli,
                    "phase": ShardPhase.ASSIGNED,
                    "message": "",
                    "generation": new_generation[row.key[0]],
                    "updated_at": now,
                }
                for row, pl in updates
            ],
        )
    started: list[StartedShard] = [
        StartedShard(row.deployment_id, row.key[1], row.key[2], pl.node, pl.accelerator_milli) for row, pl in updates
    ]
    if inserts:  # no RETURNING: the usage meter finds the rows by their keys (`start_intervals`)
        await session.execute(
            insert(_PLACEMENTS),
            [
                {
                    "deployment_id": deployments[key[0]].id,
                    "replica": key[1],
                    "shard": key[2],
                    "node_id": pl.node,
                    "accelerator_indices": list(pl.accelerator_indices),
                    "accelerator_milli": pl.accelerator_milli,
                    "phase": ShardPhase.ASSIGNED,
                    "message": "",
                    "generation": new_generation[key[0]],
                    "revision": changes.revision_of[key],
                    "updated_at": now,
                }
                for key, pl in inserts.items()
            ],
        )
        started += [StartedShard(deployments[key[0]].id, key[1], key[2], pl.node, pl.accelerator_milli)
                    for key, pl in inserts.items()]
    # The usage meter follows the placements: moved shards stop on the old node, start on the new.
    await stop_intervals(session, [row.id for row in deletes] + [row.id for row, _ in updates], now)
    await start_intervals(session, started, now, nodes=changes.nodes, deployments={
            d.id: DeploymentMeter(d.name, d.tenant_id, d.shard_accelerators, d.shard_power_w)
        for d in map(deployments.__getitem__, changed_deployments)})
    await _lock_deleted_and_updated(session, writes.lock_deployments, deleted_ids,
                                    [update_["b_id"] for update_ in deployment_updates])
    if deployment_updates:
        await session.execute(_UPDATE_DEPLOYMENT, sorted(deployment_updates, key=lambda update_: update_["b_id"]))
    for chunk in _chunks(deleted_ids):
        await session.execute(writes.delete_deployments, {"ids": listed(dialect, chunk)})
    for chunk in _chunks(sorted(changed_nodes)):
        await session.execute(writes.bump_nodes, {"ids": list(chunk)})
    return {row.key[0] for row in deletes} | {row.key[0] for row, _ in updates} | {key[0] for key in inserts}


async def _lock_deleted_and_updated(session: AsyncSession, lock: Any, deleted: list[int], updated: list[int]) -> None:
    """PostgreSQL (`lock`: `_Writes.lock_*`): the rows of one table a commit deletes and those it
    updates, when it does both, locked together in ascending id before either write (each write
    alone takes its rows in that order: `_Writes`; `lock` exists only there)."""
    if lock is not None and deleted and updated:
        await session.execute(lock, {"ids": listed(POSTGRESQL, sorted({*deleted, *updated}))})


PREEMPTED = "PREEMPTED"


def preempted_reason(replicas: list[int]) -> dict[str, Any]:
    """Why a deployment lost replicas to preemption (no other tenant's names: tenants read it)."""
    return {"code": PREEMPTED, "scope": "",
            "message": f"replica(s) {replicas} preempted (stopped) for work of higher priority or a tenant's "
                       f"reservation; re-queued: placed again when capacity frees up"}


# Placement decisions that start, stop or move a tenant's work: audited with the plan commit.
AUDITED_DECISIONS = frozenset({"deployment.placed", "deployment.preempted", "deployment.replicas_removed",
                               "shard.moved"})


def _decision_records(events: list[dict[str, Any]], tenants: dict[str, str], actor: str) -> list[audit.AuditRecord]:
    """The audit entries of one commit's decisions; one request id ties them together."""
    request_id = f"plan-{uuid.uuid4().hex}"
    return [
        audit.AuditRecord(actor=actor, role="controller", tenant=tenants.get(e["object_id"], ""), action=e["kind"],
                          object_kind=e["object_kind"], object_id=e["object_id"], request_id=request_id,
                          detail={"message": e["message"], **e["data"]})
        for e in events if e["kind"] in AUDITED_DECISIONS
    ]


def _seconds_between(earlier: datetime, later: datetime) -> float:
    if earlier.tzinfo is None:  # SQLite hands back naive UTC
        earlier = earlier.replace(tzinfo=timezone.utc)
    return max(0.0, (later - earlier).total_seconds())


def _events(
    current: dict[ShardKey, _Row],
    final: dict[ShardKey, str],
    deletes: list[_Row],
    updates: list[tuple[_Row, Any]],
    preempted: dict[str, set[int]],
    unplaced: dict[str, Any],
    reasons_changed: set[str],
    deleted_deployments: set[str],
    requeued: dict[ReplicaKey, tuple[str, ...]],
) -> list[dict[str, Any]]:
    """The history of this commit: placed/removed replicas, moved shards, new 'why not's,
    replicas the applier turned away."""
    before: dict[str, set[int]] = defaultdict(set)
    for name, replica, _ in current:
        before[name].add(replica)
    after: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for (name, replica, _), node in final.items():
        after[name][replica].add(node)
    events: list[dict[str, Any]] = []

    def add(kind: str, name: str, message: str, data: dict[str, Any]) -> None:
        events.append({"kind": kind, "object_kind": "deployment", "object_id": name, "message": message, "data": data})

    for name in sorted(set(before) | set(after)):
        placed = sorted(set(after.get(name, {})) - before.get(name, set()))
        if placed:
            nodes = sorted(set().union(*(after[name][r] for r in placed)))
            add("deployment.placed", name, f"placed replicas {placed} on {', '.join(nodes)}",
                {"replicas": placed, "nodes": nodes})
        removed = sorted(before.get(name, set()) - set(after.get(name, {})))
        by_preemption = [r for r in removed if r in preempted.get(name, ())]
        otherwise = [r for r in removed if r not in preempted.get(name, ())]
        if by_preemption:
            add("deployment.preempted", name,
                f"preempted replicas {by_preemption}: stopped for work of higher priority or a tenant's "
                f"reservation; re-queued", {"replicas": by_preemption})
        if otherwise:
            add("deployment.replicas_removed", name,
                f"replicas {otherwise} are no longer placed (node down, scaled down or not placeable again)",
                {"replicas": otherwise})
    for row, pl in updates:
        name, replica, shard = row.key
        if pl.node != row.node:
            add("shard.moved", name, f"moved replica {replica} shard {shard} from {row.node} to {pl.node}",
                {"replica": replica, "shard": shard, "from": row.node, "to": pl.node})
    for name in sorted(reasons_changed & set(unplaced)):
        u = unplaced[name]
        reasons = _reason_dicts(u.reasons)
        add("deployment.unplaceable", name,
            f"{u.replicas} replica(s) not placed: " + "; ".join(r["message"] for r in reasons),
            {"replicas": u.replicas, "reasons": reasons})
    for name in sorted(deleted_deployments):
        shards = sum(1 for row in deletes if row.key[0] == name)
        add("deployment.deleted", name, f"deleted; {shards} shard(s) released", {"shards": shards})
    turned_away: dict[str, dict[int, tuple[str, ...]]] = defaultdict(dict)
    for (name, replica), why in requeued.items():
        turned_away[name][replica] = why
    for name in sorted(turned_away):
        replicas = sorted(turned_away[name])
        why = [turned_away[name][r][0] for r in replicas]
        add("deployment.requeued", name,
            f"replicas {replicas} no longer fit where the plan put them ({why[0]}); placed again by the next pass",
            {"replicas": replicas, "why": why})
    return events
