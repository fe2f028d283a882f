"""Deployments: reads by name (with their placements), the submit's facts and inserts, deletion marks,
phases, and a deployment's view (`controller.domain.values.DeploymentView`) built from its rows."""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from types import SimpleNamespace
from typing import Any, NamedTuple

from sqlalchemy import (ColumnElement, Row, Select, Update, bindparam, insert, case, func, literal, literal_column,
                        null, select, update)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from controller.store import models as m
from controller.store.inlist import POSTGRESQL, any_of, any_of_named, any_of_named_in_order, dialect_of, listed
from controller.store.marks import refused_by_null, rowcount_unread, sqlite_refusal
from controller.store.pg_driver import sqlstate
from controller.store.unnest import InsertRows
from controller.store.changes import schedulable_count
from controller.domain import values as d
from controller.domain.paging import PageBounds
from controller.domain import restarts
from controller.domain.phases import ReplicaCounts, deployment_phase, replica_counts
from controller.store.repositories.common import _paged
from controller.store.repositories.tenants import others_reserve, tenant_deployments
from controller.store.repositories.usage import placement_milli
from controller.store.repositories.nodes import _NODES


async def count_schedulable_deployments(session: AsyncSession) -> int:
    """Deployments a snapshot holds (neither being deleted nor quarantined). At one cluster
    generation this only grows, by submissions, which leave the generation alone (a new
    deployment invalidates no plan; it only asks for another pass): how the reconciler sees them."""
    return int(await session.scalar(schedulable_count()) or 0)


# Deployments with their placements and the placements' nodes: in three statements (selectin), for
# lists and pages of any size; in one (joined) for one deployment or a few named ones, which the
# hot paths read on the event loop's turns, each statement a round trip (the selectin loads' IN
# lists of ids were also a statement text per size). Joined results need `.unique()`.
_DEPLOYMENT_LOAD = (selectinload(m.Deployment.placements).selectinload(m.Placement.node),)


_DEPLOYMENT_JOINED = (joinedload(m.Deployment.placements).joinedload(m.Placement.node),)


async def get_deployment(session: AsyncSession, tenant: str, name: str) -> m.Deployment | None:
    """The deployment `name` of `tenant` (names are per tenant)."""
    return (await session.scalars(
        select(m.Deployment).options(*_DEPLOYMENT_JOINED)
        .where(m.Deployment.tenant_id == tenant, m.Deployment.name == name)
    )).unique().one_or_none()


@dataclass(frozen=True, slots=True)
class PlacedNode:
    """What a view reads of a placement's node."""

    rack_id: str
    draining: bool


@dataclass(frozen=True, slots=True)
class PlacementColumns:
    """A placement's columns `deployment_view` reads, loaded without the ORM (`deployments_named`)."""

    replica: int
    shard: int
    node_id: str
    accelerator_indices: list[int] | None
    accelerator_milli: int | None
    phase: m.ShardPhase
    message: str
    revision: int
    node: PlacedNode | None


@dataclass(frozen=True, slots=True)
class NamedDeployment:
    """A deployment read without the ORM (`deployments_named`): its columns and its placements."""

    row: DeploymentRow
    placements: tuple[PlacementColumns, ...]

    def view(self) -> d.DeploymentView:
        return deployment_view(self.row, self.placements)


_DEPLOYMENTS, _PLACEMENTS = m.Deployment.__table__, m.Placement.__table__


# `deployments_named`' deployment columns, by their names: a plain named tuple, not the Core row
# it is cut from (a Core row's attribute read runs Python, ~0.4 us against ~0.04 for a tuple's,
# and a view reads some thirty: most of a view's cost). `view_as_written` `_replace`s fields.
DeploymentRow = namedtuple("DeploymentRow", [c.key for c in _DEPLOYMENTS.c])  # type: ignore[misc]


# A deployment's columns by attribute name without the ORM: a `DeploymentRow` of its table
# (`deployments_named`), a Core row of it, or the columns written for a new one (`new_deployment_view`).
DeploymentColumns = DeploymentRow | Row[Any] | SimpleNamespace


_PLACEMENT_READ = ("replica", "shard", "node_id", "accelerator_indices", "accelerator_milli", "phase", "message",
                   "revision")  # with the node's rack and draining flag: `PlacementColumns`, in order


def _named_query(dialect: str, *, lock: bool = False, by_id: bool = False) -> Select:
    """`deployments_named`' query for `dialect`, its list named `names` (`by_id`: a list of ids named
    `ids`, `deployments_with_ids`'): each deployment's columns (by their names), then, outer
    joined, those of each placement and its node (labelled apart): a row per placement, one for a
    deployment with none. `lock`: the deployments' rows locked to
    the end of the transaction (PostgreSQL: FOR NO KEY UPDATE OF deployments, which rows that
    refer to them do not wait for; SQLite: as without), in ascending id as a plan commit locks them
    (the lock order: store/changes.py), and on PostgreSQL one more column, whether the row was
    written by a commit the lock waited for (`_WRITTEN_UNDER_LOCK`)."""
    placement = _PLACEMENTS.c
    written = (_WRITTEN_UNDER_LOCK,) if lock and dialect == POSTGRESQL else ()
    query = (select(_DEPLOYMENTS, *(placement[c].label(f"placement_{c}") for c in _PLACEMENT_READ),
                    _NODES.c.rack_id.label("node_rack_id"), _NODES.c.draining.label("node_draining"), *written)
             .select_from(_DEPLOYMENTS.outerjoin(_PLACEMENTS, placement.deployment_id == _DEPLOYMENTS.c.id)
                          .outerjoin(_NODES, _NODES.c.id == placement.node_id))
             .where(any_of_named(dialect, _DEPLOYMENTS.c.id, "ids") if by_id
                    else any_of_named(dialect, _DEPLOYMENTS.c.name, "names")))
    return query.order_by(_DEPLOYMENTS.c.id).with_for_update(of=_DEPLOYMENTS, key_share=True) if lock else query


# PostgreSQL (READ COMMITTED): a locking read that waited for a commit holding a row hands back
# that row as the commit left it (re-read: EvalPlanQual) but the rows joined to it as the
# statement's snapshot had them: a report flush judged a deployment's phase by shards a plan
# commit had removed, or without those it added. The row's version (xmin) against the one the
# snapshot sees (a subquery, not re-read) tells such a row; its placements are read again.
_AS_READ = _DEPLOYMENTS.alias("as_read")


_WRITTEN_UNDER_LOCK = (literal_column("deployments.xmin::text") != select(literal_column("as_read.xmin::text"))
                       .where(_AS_READ.c.id == _DEPLOYMENTS.c.id).scalar_subquery()).label("written_under_lock")


_NAMED = {dialect: _named_query(dialect) for dialect in ("sqlite", POSTGRESQL)}


_NAMED_LOCKED = {dialect: _named_query(dialect, lock=True) for dialect in ("sqlite", POSTGRESQL)}


_WITH_IDS = {dialect: _named_query(dialect, by_id=True) for dialect in ("sqlite", POSTGRESQL)}


_DEPLOYMENT_WIDTH = len(_DEPLOYMENTS.c)


_PLACEMENT_WIDTH = len(_PLACEMENT_READ) + 2  # with the node's rack and draining flag


async def deployments_named(session: AsyncSession, names: Iterable[str], *, lock: bool = False) -> list[NamedDeployment]:
    """The deployments called any of `names`, in every tenant (a batch of by-name calls), with
    their placements: one query of plain columns. As ORM entities (joined) the same read was the
    largest item of a delete batch's CPU after its flush (docs/benchmarks.md, `unary`).
    `lock`: their rows are locked to the end of the transaction (PostgreSQL; SQLite's writer is
    one already), so that what is written from this read is not written over a commit that lands
    in between (that commit is waited for, and read)."""
    queries = _NAMED_LOCKED if lock else _NAMED
    named, written = _grouped(await session.execute(queries[dialect_of(session)], {"names": sorted(set(names))}))
    if not written:
        return named
    # Locked now: read again (a statement of its own sees that commit), as committed.
    again = {dep.row.id: dep for dep in await deployments_named(session, written)}
    return [again.get(dep.row.id, dep) for dep in named]


def _grouped(rows: Iterable[Row[Any]]) -> tuple[list[NamedDeployment], set[str]]:
    """`_named_query`'s rows (a row per placement) as deployments with their placements, and the
    names of those written by a commit the lock waited for (`_WRITTEN_UNDER_LOCK`)."""
    found: dict[int, tuple[DeploymentRow, list[PlacementColumns]]] = {}
    written: set[str] = set()
    for row in rows:
        entry = found.get(row.id)
        if entry is None:
            entry = found[row.id] = (DeploymentRow._make(row[:_DEPLOYMENT_WIDTH]), [])
        replica, shard, node_id, indices, milli, phase, message, revision, rack_id, draining = \
            row[_DEPLOYMENT_WIDTH:_DEPLOYMENT_WIDTH + _PLACEMENT_WIDTH]
        if replica is not None:  # a placement (the outer join's NULLs: none)
            entry[1].append(PlacementColumns(replica, shard, node_id, indices, milli, phase, message, revision,
                                             None if rack_id is None else PlacedNode(rack_id, draining)))
        if len(row) > _DEPLOYMENT_WIDTH + _PLACEMENT_WIDTH and row[-1]:
            written.add(entry[0].name)
    return [NamedDeployment(row, tuple(placed)) for row, placed in found.values()], written


def _deleting_statement(dialect: str) -> Update:
    """`set_deleting`'s UPDATE for `dialect`: the deployments of the ids `ids` DELETING as of `at`.
    A row DELETING already gets NULL, which the column refuses (`changed_since_read`)."""
    table = m.Deployment.__table__
    deleting = m.DeploymentPhase.DELETING
    return rowcount_unread(update(table).where(any_of_named_in_order(dialect, table.c.id, "ids", deletes=False)).values(
        phase=case((table.c.phase == deleting, null()), else_=literal(deleting, table.c.phase.type)),
        updated_at=bindparam("at")))


_DELETING = {dialect: _deleting_statement(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def take_resource_version(session: AsyncSession, deployment_id: int, expected: int) -> bool:
    """Move the deployment's resource version from `expected` to the next, if it is still
    `expected` (one conditional UPDATE: on PostgreSQL it waits for a concurrent writer of the row
    and judges what that one committed; on SQLite it takes the writer first). False: another
    change landed since `expected` was read, and this one must not write over it."""
    result = await session.execute(update(_DEPLOYMENTS).where(
        _DEPLOYMENTS.c.id == deployment_id, _DEPLOYMENTS.c.resource_version == expected).values(
        resource_version=expected + 1))
    return bool(result.rowcount)


async def reload_placements(session: AsyncSession, row: m.Deployment) -> None:
    """The deployment's placements (with their nodes) read again into `row`, as stored now: what
    plan commits and report flushes wrote since `row` was read (an update holding the row)."""
    placements = (await session.scalars(
        select(m.Placement).options(joinedload(m.Placement.node)).where(m.Placement.deployment_id == row.id)
        .execution_options(populate_existing=True))).unique().all()
    set_committed_value(row, "placements", list(placements))


async def deployment_exists(session: AsyncSession, deployment_id: int) -> bool:
    """Whether the deployment's row is still there (not removed since it was read)."""
    return (await session.execute(select(_DEPLOYMENTS.c.id).where(_DEPLOYMENTS.c.id == deployment_id))).first() \
        is not None


async def lock_revision_placements(session: AsyncSession, deployment_id: int, revision: int) -> None:
    """Lock the deployment's placements of `revision` (ascending id, `FOR NO KEY UPDATE` on
    PostgreSQL) for `adopt_revision`: taken before isolation_state's row and the deployment's,
    as a plan commit takes placements first (store/changes.py's lock order)."""
    await session.execute(select(_PLACEMENTS.c.id).where(
        _PLACEMENTS.c.deployment_id == deployment_id, _PLACEMENTS.c.revision == revision)
        .order_by(_PLACEMENTS.c.id).with_for_update(key_share=True))


async def adopt_revision(session: AsyncSession, row: m.Deployment, old: int, new: int) -> int:
    """The deployment's placements of revision `old` made revision `new`'s (its replicas run
    what `new` asks: a rollback to their spec), in the database and in `row`'s loaded
    placements; how many shards. Lock them first (`lock_revision_placements`)."""
    result = await session.execute(update(_PLACEMENTS).where(
        _PLACEMENTS.c.deployment_id == row.id, _PLACEMENTS.c.revision == old).values(revision=new))
    for placement in row.placements:
        if placement.revision == old:
            set_committed_value(placement, "revision", new)
    return int(result.rowcount or 0)


# Every column of a deployment's row, by attribute (what a refresh of the whole row reads; its
# placements stay as loaded).
DEPLOYMENT_COLUMN_ATTRIBUTES = [attribute.key for attribute in sa_inspect(m.Deployment).column_attrs]
# What writers other than an update change of a deployment's row, leaving its resource version:
# plan commits (its phase, its revisions' specs once retired), report flushes and failures.
UNVERSIONED_COLUMNS = ("phase", "reasons", "failures", "last_failure_at", "restart_after", "revision_specs",
                       "generation")


async def set_deleting(session: AsyncSession, rows: Sequence[m.Deployment | DeploymentColumns]) -> datetime:
    """Mark deployments DELETING in ONE UPDATE statement; returns the time written. ORM rows
    among them are updated as written (nothing left for the session to flush: the ORM's flush of
    the same change, its unit of work over every loaded row and placement, was most of a batch of
    deletions' CPU); the views of plain rows read what it wrote with `deleting_view`.

    The caller read them not DELETING; one that another transaction marked since (a lone delete
    racing a batch of the same name) fails the statement, and so the caller's transaction, before
    its event, bump or audit entry is written (`changed_since_read`; on SQLite inside
    `deferred_writes`, at the COMMIT): nothing reads the statement's row count, so a deployment is
    never marked twice without a trip to learn it. One removed since (the UPDATE matches no row)
    is told by the events' INSERT that follows (`deleting_events`)."""
    at = m.utcnow()
    dialect = dialect_of(session)
    ids = [row.id for row in rows]
    await session.execute(_DELETING[dialect], {"ids": listed(dialect, ids), "at": at})
    for row in rows:
        if isinstance(row, m.Deployment):
            set_committed_value(row, "phase", m.DeploymentPhase.DELETING)
            set_committed_value(row, "updated_at", at)
    return at


# `deleting_events`' INSERT: a `deployment.deleting` event whose object is its key only while the
# row of its id is still the deployment its caller read (the same tenant and name), and NULL, which
# the column refuses, when that row is gone (removed since the read) or is another deployment's (a
# new row under its id: SQLite gave a removed last row's id to the next one until migration 0024).
_DEPLOYMENTS_TABLE = m.Deployment.__table__


_DELETING_EVENT = insert(m.Event.__table__).values(
    kind="deployment.deleting", object_kind="deployment", message="",
    object_id=select(bindparam("key", type_=m.Event.__table__.c.object_id.type)).where(
        _DEPLOYMENTS_TABLE.c.id == bindparam("deployment_id"), _DEPLOYMENTS_TABLE.c.tenant_id == bindparam("tenant"),
        _DEPLOYMENTS_TABLE.c.name == bindparam("name")).scalar_subquery())


def deleting_events(rows: Sequence[tuple[m.Deployment | DeploymentColumns, str]]) -> DeletingEvents:
    """The `deployment.deleting` events (each by its actor) of the deployments `set_deleting`
    marked, to write after it in ONE INSERT statement: a `riders.Rider` (on PostgreSQL it may
    ride in the caller's audit append). `set_deleting`'s UPDATE matches by id and reads no row
    count, so it cannot tell a row removed since its caller read it (marked by another delete and
    removed by the reconciler; a quarantined one released by a submit) from one it marked, nor a
    new row that took the removed one's id from the one read: this INSERT refuses (NOT NULL on
    `events.object_id`) unless every row is there as read, so the transaction fails whole, the
    UPDATE with it (`changed_since_read`). Nothing is read back (`marks.deferred_writes`)."""
    at = m.utcnow()
    return DeletingEvents([{"at": at, "actor": actor, "data": {}, "key": d.deployment_key(row.tenant_id, row.name),
                            "deployment_id": row.id, "tenant": row.tenant_id, "name": row.name} for row, actor in rows])


@dataclass(frozen=True)
class DeletingEvents:
    """`deleting_events`: `_DELETING_EVENT`'s rows, by an executemany (`write`), or over arrays
    in a WITH of another statement (`cte`): a deployment's row read by that statement's snapshot,
    after this transaction's `set_deleting` (its row locked by it since)."""

    rows: list[dict[str, Any]]

    @property
    def empty(self) -> bool:
        return not self.rows

    def cte(self, name: str, dialect: Dialect) -> str:
        return (f"{name} AS (INSERT INTO events (at, actor, data, kind, object_kind, message, object_id) "
                f"SELECT v.at, v.actor, CAST('{{}}' AS JSON), 'deployment.deleting', 'deployment', '', "
                "(SELECT v.key FROM deployments WHERE deployments.id = v.id AND deployments.tenant_id = v.tenant "
                f"AND deployments.name = v.name) FROM unnest(CAST(:{name}at AS TIMESTAMPTZ[]), "
                f"CAST(:{name}actor AS TEXT[]), CAST(:{name}key AS TEXT[]), CAST(:{name}id AS INTEGER[]), "
                f"CAST(:{name}tenant AS TEXT[]), CAST(:{name}name AS TEXT[])) AS v(at, actor, key, id, tenant, name))")

    def params(self, name: str, dialect: Dialect) -> dict[str, Any]:
        return {f"{name}{param}": [row[column] for row in self.rows] for param, column in (
            ("at", "at"), ("actor", "actor"), ("key", "key"), ("id", "deployment_id"), ("tenant", "tenant"),
            ("name", "name"))}

    async def write(self, session: AsyncSession) -> None:
        if self.rows:
            await session.execute(_DELETING_EVENT, self.rows)


# The NULLs a mark writes when what its caller read changed since: `deployments.phase` (marked
# DELETING since: `set_deleting`), `events.object_id` (its row gone since: `deleting_events`).
_CHANGED_SINCE_READ = ((_DEPLOYMENTS_TABLE.name, _DEPLOYMENTS_TABLE.c.phase.name),
                       (m.Event.__table__.name, m.Event.__table__.c.object_id.name))


def changed_since_read(exc: BaseException) -> bool:
    """`exc` is a mark's refusal of a deployment that changed after its caller read it: marked
    DELETING since (the NULL `set_deleting` wrote into `deployments.phase`) or gone since (the NULL
    `deleting_events` wrote into `events.object_id`), and nothing else (`marks.refused_by_null`)."""
    return refused_by_null(exc, _CHANGED_SINCE_READ)


def deleting_view(deployment: NamedDeployment, at: datetime) -> d.DeploymentView:
    """The view of a deployment read by `deployments_named` once `set_deleting` marked it `at`:
    what its UPDATE wrote (the phase and the time) over what was read."""
    return replace(deployment.view(), phase=m.DeploymentPhase.DELETING.value, updated_at=at)


async def tenants_with_deployment(session: AsyncSession, name: str, limit: int = 2) -> list[str]:
    """Tenants that have a deployment called `name` (the first `limit`, by tenant id)."""
    return list(await session.scalars(
        select(m.Deployment.tenant_id).where(m.Deployment.name == name).order_by(m.Deployment.tenant_id).limit(limit)
    ))


def _named_as_any(session: AsyncSession, keys: Iterable[str]) -> ColumnElement[bool]:
    """Deployments named as any of `keys` (`TENANT/NAME`): by name alone, which the index serves; a
    superset that the caller narrows to the keys' tenants."""
    return any_of(session, m.Deployment.name, {d.split_deployment_key(k)[1] for k in keys})


_PAGE_KEYS = select(_DEPLOYMENTS.c.name, _DEPLOYMENTS.c.id).order_by(_DEPLOYMENTS.c.name, _DEPLOYMENTS.c.id)


async def deployment_page_keys(session: AsyncSession, *, tenant: str = "", name: str = "",
                               page: PageBounds | None = None) -> list[tuple[str, int]]:
    """(name, id) of a page of deployments by name then id (of one tenant, of one name), one more
    than the page holds (`_paged`): the keys `deployments_with_ids` reads the page by."""
    stmt = _PAGE_KEYS
    if tenant:
        stmt = stmt.where(_DEPLOYMENTS.c.tenant_id == tenant)
    if name:
        stmt = stmt.where(_DEPLOYMENTS.c.name == name)
    return [(row_name, row_id) for row_name, row_id in
            await session.execute(_paged(stmt, page, _DEPLOYMENTS.c.name, _DEPLOYMENTS.c.id))]


async def deployments_with_ids(session: AsyncSession, ids: Iterable[int]) -> dict[int, NamedDeployment]:
    """The deployments of these ids that exist, with their placements, by id: one query of plain
    columns (`deployments_named`' by ids). Through the ORM (`list_deployment_rows`, each row made a
    view) a page of 100 cost 10-13 ms of the event loop's CPU at 10,000 deployments, against ~6
    (docs/benchmarks.md, `listcore`)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    dialect = dialect_of(session)
    named, _ = _grouped(await session.execute(_WITH_IDS[dialect], {"ids": listed(dialect, wanted)}))
    return {found.row.id: found for found in named}


async def list_deployment_rows(
    session: AsyncSession, *, tenant: str = "", keys: Iterable[str] | None = None,
    phases: Iterable[m.DeploymentPhase] | None = None, name: str = "",
) -> list[m.Deployment]:
    """Deployments by name (then id) as ORM rows with their placements, optionally of one tenant,
    of one name, with given keys (`TENANT/NAME`), or in given phases. The controller's lists read
    plain columns (`deployment_page_keys` and `deployments_with_ids`; the console's
    `deployment_summary_rows`); this reading is the one their tests hold them to."""
    named = keys is not None or bool(name)  # a few: joined (see `_DEPLOYMENT_JOINED`)
    stmt = (select(m.Deployment).options(*(_DEPLOYMENT_JOINED if named else _DEPLOYMENT_LOAD))
            .order_by(m.Deployment.name, m.Deployment.id))
    if tenant:
        stmt = stmt.where(m.Deployment.tenant_id == tenant)
    if name:
        stmt = stmt.where(m.Deployment.name == name)
    wanted: set[str] | None = None
    if keys is not None:
        wanted = set(keys)
        stmt = stmt.where(_named_as_any(session, wanted))
    if phases is not None:
        stmt = stmt.where(m.Deployment.phase.in_(list(phases)))
    found = await session.scalars(stmt)
    rows = list(found.unique() if named else found)
    if wanted is not None:  # the names matched; the tenants must too
        rows = [r for r in rows if d.deployment_key(r.tenant_id, r.name) in wanted]
    return rows


@dataclass(frozen=True)
class SubmitFacts:
    """What a submit's checks read of the store, in one query."""

    tenant_zones: tuple[str, ...]
    exists: bool               # the tenant has a deployment of that name
    deployments: int           # the tenant's deployments
    capacity_generation: int
    others_reserve: bool = False  # another tenant has a reservation (a non-preemptible ask is checked against it)


def _submit_facts_query() -> Select:
    tenant, name = bindparam("tenant"), bindparam("name")
    exists = select(m.Deployment.id).where(m.Deployment.tenant_id == tenant, m.Deployment.name == name).exists()
    count = tenant_deployments(tenant)
    generation = select(m.CapacityState.generation).where(m.CapacityState.id == 1).scalar_subquery()
    return select(m.Tenant.zones, exists, count, generation, others_reserve(tenant)).where(m.Tenant.id == tenant)


# Built once: building it per submit was a third of the submit's reads' Python time (py-spy, bench e2e).
_SUBMIT_FACTS = _submit_facts_query()


async def submit_facts(session: AsyncSession, tenant: str, name: str) -> SubmitFacts | None:
    """The facts a submit of `tenant`/`name` is checked against; None when there is no such tenant."""
    row = (await session.execute(_SUBMIT_FACTS, {"tenant": tenant, "name": name})).one_or_none()
    if row is None:
        return None
    zones, found, deployments, capacity_generation, others_reserve = row
    return SubmitFacts(tuple(zones or ()), bool(found), int(deployments), int(capacity_generation or 0),
                       bool(others_reserve))


async def count_deployments_by_phase(session: AsyncSession, tenant: str = "") -> dict[str, int]:
    query = select(m.Deployment.phase, func.count()).group_by(m.Deployment.phase)
    if tenant:
        query = query.where(m.Deployment.tenant_id == tenant)
    rows = await session.execute(query)
    return {phase.value: int(n) for phase, n in rows}


def deployment_spec(row: m.Deployment) -> d.DeploymentSpec:
    spread = None
    if row.spread_domain is not None and row.spread_max_per_domain:
        spread = d.Spread(row.spread_domain.value, row.spread_max_per_domain)
    return d.DeploymentSpec(
        name=row.name, tenant=row.tenant_id, replicas=row.replicas, min_replicas=row.min_replicas,
        shards_per_replica=row.shards_per_replica,
        shard=d.ShardSpec(
            accelerators=row.shard_accelerators, accelerator_milli=row.shard_accelerator_milli,
            hbm_gib=row.shard_hbm_gib, cpu_milli=row.shard_cpu_milli, memory_mib=row.shard_memory_mib,
            power_w=row.shard_power_w, accelerator_models=tuple(row.shard_accelerator_models or ()) or None,
        ),
        locality=row.locality.value, spread=spread, priority=row.priority, preemptible=row.preemptible,
    )


def spec_columns(spec: d.DeploymentSpec) -> dict[str, object]:
    """The deployment columns (by attribute name) a spec sets."""
    return {
        "name": spec.name, "tenant_id": spec.tenant,
        "replicas": spec.replicas, "min_replicas": spec.min_replicas, "shards_per_replica": spec.shards_per_replica,
        "shard_accelerators": spec.shard.accelerators, "shard_accelerator_milli": spec.shard.accelerator_milli,
        "shard_hbm_gib": spec.shard.hbm_gib, "shard_cpu_milli": spec.shard.cpu_milli,
        "shard_memory_mib": spec.shard.memory_mib, "shard_power_w": spec.shard.power_w,
        "shard_accelerator_models": list(spec.shard.accelerator_models or ()),
        "locality": m.Domain(spec.locality),
        "spread_domain": m.Domain(spec.spread.domain) if spec.spread else None,
        "spread_max_per_domain": spec.spread.max_per_domain if spec.spread else None,
        "priority": spec.priority, "preemptible": spec.preemptible,
    }


def new_deployment_columns(spec: d.DeploymentSpec, at: datetime) -> dict[str, object]:
    """A new deployment's columns (by attribute name): the spec's, PENDING, nothing placed, its
    first revision, created `at`."""
    return {**spec_columns(spec), "phase": m.DeploymentPhase.PENDING, "reasons": [], "generation": 0,
            "resource_version": 1, "template_revision": 1, "revision_specs": {}, "failures": 0,
            "created_at": at, "updated_at": at}


def new_deployment_row(spec: d.DeploymentSpec) -> m.Deployment:
    return m.Deployment(**new_deployment_columns(spec, m.utcnow()), placements=[])


def new_deployment_view(columns: dict[str, object]) -> d.DeploymentView:
    """`deployment_view` of the row inserted with `columns` (`new_deployment_columns`), which has
    no placements yet: the row as it reads back (`deployment_spec`: no accelerator models is
    None, a spread needs its maximum), by the one reading of a row there is."""
    return deployment_view(SimpleNamespace(**columns), ())


async def insert_deployments(session: AsyncSession, specs: Iterable[d.DeploymentSpec], *,
                             ids: Sequence[int] | None = None) -> list[tuple[int, d.DeploymentView]]:
    """New deployments (as `new_deployment_row`) written in ONE INSERT statement; returns their
    ids and views, in order. No ORM rows: the ORM's flush wrote one statement per row on SQLite (to
    learn each id in order), and building the rows was most of a batch's own CPU.

    With `ids` (`tenants.SubmitBatchReads.deployment_ids`: at least one a spec) the rows take them
    in order and the INSERT reads nothing back: inside `marks.deferred_writes` it waits for the
    transaction's next trip (SQLite: its COMMIT, to SQLite's thread; PostgreSQL: the message of
    its BEGIN, or of its COMMIT when nothing is sent between). An id another
    transaction took since it was read fails the statement (the primary key; nothing is written in
    a failed transaction), as a name taken since does. Without, the database gives them (on
    PostgreSQL over arrays: one text to prepare for any number of rows,
    `InsertRows.insert_returning`; the ids are matched by (tenant, name), which is unique)."""
    at = m.utcnow()
    specs = list(specs)
    if not specs:
        return []
    table = m.Deployment.__table__
    columns = [new_deployment_columns(spec, at) for spec in specs]
    if ids is not None:
        if len(ids) < len(specs):
            raise ValueError(f"{len(specs)} deployments to insert with {len(ids)} ids")
        taken = ids[:len(specs)]
        await InsertRows(table, [{**c, "id": id_} for id_, c in zip(taken, columns)]).insert(session)
        return [(id_, new_deployment_view(written)) for id_, written in zip(taken, columns)]
    ids_of = {(tenant, name): id_ for id_, tenant, name in await InsertRows(table, columns).insert_returning(
        session, "id", "tenant_id", "name")}
    return [(ids_of[(spec.tenant, spec.name)], new_deployment_view(written)) for spec, written in zip(specs, columns)]


def deployment_id_taken(exc: BaseException) -> bool:
    """`exc` is SQLite's refusal of a deployment id that another row holds (its primary key), and
    nothing else: what an INSERT with ids chosen ahead (`insert_deployments(ids=)`) meets when
    another transaction took one of them after they were read."""
    return (isinstance(exc, IntegrityError) and isinstance(exc.orig, sqlite3.IntegrityError)
            and sqlite_refusal(exc.orig, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY,
                               {f"UNIQUE constraint failed: {_DEPLOYMENTS_TABLE.name}.{_DEPLOYMENTS_TABLE.c.id.name}"}))


FOREIGN_KEY_VIOLATION = "23503"  # PostgreSQL's SQLSTATE


def tenant_gone(exc: BaseException) -> bool:
    """`exc` is the refusal of a deployment's row whose tenant is no longer there (its foreign key,
    the only one a deployment's row has): the tenant deleted after the submit read it."""
    if not isinstance(exc, IntegrityError):
        return False
    if isinstance(exc.orig, sqlite3.IntegrityError):
        return sqlite_refusal(exc.orig, sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY, {"FOREIGN KEY constraint failed"})
    return sqlstate(exc) == FOREIGN_KEY_VIOLATION


def write_deployment_spec(row: m.Deployment, spec: d.DeploymentSpec) -> None:
    """The spec's fields onto the row (an update in place)."""
    for attribute, value in spec_columns(spec).items():
        setattr(row, attribute, value)


def _revision_doc(row: m.Deployment, revision: int) -> dict | None:
    """The interchange spec of an older revision still running (None: the current one)."""
    return None if revision == row.template_revision else (row.revision_specs or {}).get(str(revision))


def _outgoing(row: m.Deployment, p: m.Placement) -> bool:
    return p.revision != row.template_revision or bool(p.node is not None and p.node.draining)


def _replica_counts(row: m.Deployment | DeploymentColumns,
                    placements: Iterable[m.Placement | PlacementColumns] | None = None) -> ReplicaCounts:
    placements = row.placements if placements is None else list(placements)
    sizes = {p.replica: int(doc["shards_per_replica"]) for p in placements
             if (doc := _revision_doc(row, p.revision)) is not None}
    return replica_counts(row.shards_per_replica, ((p.replica, p.phase) for p in placements), sizes)


def implied_phase(row: m.Deployment | DeploymentColumns,
                  placements: Sequence[m.Placement | PlacementColumns] | None = None) -> m.DeploymentPhase:
    """The phase its stored placements (or `placements`, for a row read without the ORM) imply
    (domain/phases' rule; DELETING and FAILED are sticky)."""
    if row.phase is m.DeploymentPhase.QUARANTINED:
        return row.phase  # sticky until it is submitted again or deleted
    return m.DeploymentPhase(deployment_phase(
        row.replicas, _replica_counts(row, placements), deleting=row.phase is m.DeploymentPhase.DELETING,
        failed=row.phase is m.DeploymentPhase.FAILED, failing=bool(restarts.failure_reasons(row.reasons or ())),
        min_replicas=row.min_replicas))


def clear_failures(row: m.Deployment) -> None:
    """A fresh start for a deployment whose shards failed (its spec changed): failures in a row
    forgotten, and a FAILED deployment placed again (domain/restarts.py)."""
    row.failures, row.last_failure_at, row.restart_after = 0, None, None
    if row.phase is m.DeploymentPhase.FAILED:
        row.phase = m.DeploymentPhase.PENDING
        row.phase = implied_phase(row)


_NOTHING_PLACED = replica_counts(1, ())


def deployment_view(row: m.Deployment | DeploymentColumns,
                    placements: Sequence[m.Placement | PlacementColumns] | None = None) -> d.DeploymentView:
    """What callers read of a deployment: of a loaded ORM row with its placements (and their
    nodes), or of a row's columns with the placements given (`deployments_named`,
    `new_deployment_view`): one reading of a row for both."""
    placed = row.placements if placements is None else placements
    counts = updated = _NOTHING_PLACED  # nothing placed (a new or pending deployment): nothing to count
    shard_views: tuple[d.ShardPlacementView, ...] = ()
    outgoing_replicas = 0
    if placed:
        counts = _replica_counts(row, placed)
        views: list[d.ShardPlacementView] = []
        current: list[m.Placement | PlacementColumns] = []
        outgoing: set[int] = set()
        for p in sorted(placed, key=lambda p: (p.replica, p.shard)):  # each placement's columns read once
            leaving = _outgoing(row, p)
            milli = placement_milli(row, p)
            node = p.node
            views.append(d.ShardPlacementView(
                replica=p.replica, shard=p.shard, node=p.node_id, rack=node.rack_id if node else "",
                accelerator_indices=tuple(p.accelerator_indices or ()), accelerator_milli=milli if milli < 1000 else 0,
                phase=p.phase.value, message=p.message or "", revision=p.revision, outgoing=leaving,
            ))
            if leaving:
                outgoing.add(p.replica)
            else:
                current.append(p)
        shard_views = tuple(views)
        outgoing_replicas = len(outgoing)
        updated = counts if len(current) == len(placed) else _replica_counts(row, current)  # none outgoing: the same
    return d.DeploymentView(
        spec=deployment_spec(row), phase=row.phase.value, generation=row.generation,
        placed_replicas=counts.placed, running_replicas=counts.running, placements=shard_views,
        reasons=tuple(d.ReasonView(r.get("code", ""), r.get("message", ""), r.get("scope") or "")
                      for r in row.reasons or ()),
        created_at=row.created_at, updated_at=row.updated_at,
        resource_version=row.resource_version, revision=row.template_revision,
        updated_replicas=updated.running, outgoing_replicas=outgoing_replicas,
    )


class DeploymentSummary(NamedTuple):
    """What a list of every deployment shows of one (the console): a `DeploymentView`'s name,
    tenant, phase and replica counts, with its stored reasons."""

    name: str
    tenant: str
    phase: str
    replicas: int
    placed_replicas: int
    running_replicas: int
    reasons: list[dict[str, Any]]


_SUMMARY_DEPLOYMENTS = select(
    _DEPLOYMENTS.c.id, _DEPLOYMENTS.c.name, _DEPLOYMENTS.c.tenant_id, _DEPLOYMENTS.c.phase, _DEPLOYMENTS.c.replicas,
    _DEPLOYMENTS.c.shards_per_replica, _DEPLOYMENTS.c.template_revision, _DEPLOYMENTS.c.revision_specs,
    _DEPLOYMENTS.c.reasons).order_by(_DEPLOYMENTS.c.name, _DEPLOYMENTS.c.id)
_SUMMARY_PLACEMENTS = select(_PLACEMENTS.c.deployment_id, _PLACEMENTS.c.replica, _PLACEMENTS.c.revision,
                             _PLACEMENTS.c.phase)


@dataclass(frozen=True)
class SummaryRows:
    """Every deployment's columns and its placements' (plain columns: `deployment_summary_rows`),
    made `DeploymentSummary`s by `summaries` (CPU only: a caller's worker thread)."""

    deployments: Sequence[Row[Any]]
    placements: Sequence[Row[Any]]

    def summaries(self) -> list[DeploymentSummary]:
        """By name then id; the replica counts as `deployment_view` counts them."""
        placed: dict[int, list[Row[Any]]] = {}
        for p in self.placements:
            placed.setdefault(p.deployment_id, []).append(p)
        out = []
        for row in self.deployments:
            counts = _replica_counts(row, placed[row.id]) if row.id in placed else _NOTHING_PLACED
            out.append(DeploymentSummary(row.name, row.tenant_id, row.phase.value, row.replicas, counts.placed,
                                         counts.running, list(row.reasons or ())))
        return out


async def deployment_summary_rows(session: AsyncSession, *, tenant: str = "") -> SummaryRows:
    """The rows of every deployment's summary (of `tenant`'s, if given), in two statements."""
    deployments, placements = _SUMMARY_DEPLOYMENTS, _SUMMARY_PLACEMENTS
    if tenant:
        deployments = deployments.where(_DEPLOYMENTS.c.tenant_id == tenant)
        placements = placements.join_from(_PLACEMENTS, _DEPLOYMENTS, _PLACEMENTS.c.deployment_id == _DEPLOYMENTS.c.id) \
            .where(_DEPLOYMENTS.c.tenant_id == tenant)
    return SummaryRows((await session.execute(deployments)).all(), (await session.execute(placements)).all())
