"""The committed state a plan commit is checked against: the deployments it speaks for and their placements.

`commit_plan` (plans/commit.py) reads it under the generation's lock, and a scoped commit also
before it: `_read_committed` hands back the very `_Committed` of the early read when the rows
and the generation are as they were, so the check made on it stands (`commit_plan`). Its
statements are built once a dialect (`_CommittedQueries`), with the tables' columns (Core). The
shapes the rest of the package passes around live here too: a placement row (`_Row`), where a
shard is (`_where`), what a commit compares of a read (`_rows`), and `IN` lists in `_chunks`.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, String, and_, bindparam, func, insert, select, true, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.changes import MissingGeneration, move_generation, logged_ids, read_generation
from controller.store.inlist import POSTGRESQL, any_of_named, dialect_of
from controller.store.models import ClusterChangeRow, ClusterState, Deployment, DeploymentPhase, Placement, ShardPhase
from controller.store.snapshot import ShardKey, Where
from controller.domain.changes import ClusterChange
from controller.domain.values import deployment_key, split_deployment_key


# Keeps `IN (...)` lists well under every backend's bound-parameter limit.
_CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


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


_PlacedRows = dict[ShardKey, tuple[str, tuple[int, ...], int | None, ShardPhase, int]]


def _rows(committed: _Committed) -> tuple[dict[str, Any], _PlacedRows]:
    """What a commit compares of a read: its deployments' rows and their placements (by key,
    without their ids: a row written by this transaction has one it has not read)."""
    placed = {row.key: (row.node, tuple(row.indices), row.milli, row.phase, row.revision)
              for row in (*committed.current.values(), *committed.leaving)}
    return dict(committed.deployments), placed
