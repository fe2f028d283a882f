"""Tenants: their rows and contracts, what a submit batch reads of them, their client request ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Text, bindparam, cast, delete, func, literal_column, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from controller.store import models as m
from controller.store.inlist import POSTGRESQL, any_of, any_of_named, dialect_of
from controller.store.marks import rowcount_unread
from controller.domain import values as d
from controller.domain.paging import PageBounds
from controller.store.repositories.common import _paged


_REQUESTS = m.ClientRequest.__table__


@dataclass(frozen=True)
class ForgetRequestIds:
    """Drop the tenants' client request ids whose deployment is gone and that were made before
    `before`: a `riders.Rider`, on PostgreSQL one DELETE that may ride in another statement. No
    write in that statement inserts what it deletes (a batch's new ids were not in the table at
    its read, else it would have handed them back)."""

    tenants: tuple[str, ...]
    before: datetime

    @property
    def empty(self) -> bool:
        return not self.tenants

    def cte(self, name: str, dialect: Dialect) -> str:
        return (f"{name} AS (DELETE FROM {_REQUESTS.name} WHERE {_REQUESTS.c.tenant_id.name} = ANY(CAST(:{name}t AS "
                f"TEXT[])) AND {_REQUESTS.c.deployment_id.name} IS NULL AND {_REQUESTS.c.created_at.name} < :{name}b)")

    def params(self, name: str, dialect: Dialect) -> dict[str, Any]:
        return {f"{name}t": list(self.tenants), f"{name}b": self.before}

    async def write(self, session: AsyncSession) -> None:
        for tenant_id in self.tenants:
            await session.execute(rowcount_unread(delete(m.ClientRequest).where(
                m.ClientRequest.tenant_id == tenant_id, m.ClientRequest.deployment_id.is_(None),
                m.ClientRequest.created_at < self.before)).execution_options(synchronize_session=False))


async def get_tenant(session: AsyncSession, tenant_id: str) -> m.Tenant | None:
    return await session.get(m.Tenant, tenant_id)


async def tenant_created_at(session: AsyncSession, tenant_id: str) -> datetime | None:
    """When the tenant (its id's present customer) was created; None when there is none."""
    customer = await customer_of(session, tenant_id)
    return customer.created_at if customer is not None else None


@dataclass(frozen=True)
class Customer:
    """A tenant id's present customer: when it was created, and what the id had used to date
    then (accelerator-seconds, joules: its customers' before; None when created before migration
    0030 stored it)."""

    created_at: datetime
    usage_before: tuple[float, float] | None


async def customer_of(session: AsyncSession, tenant_id: str) -> Customer | None:
    """The tenant's present customer (None: no such tenant)."""
    row = await get_tenant(session, tenant_id)
    if row is None:
        return None
    before = row.usage_before_accelerator_s, row.usage_before_energy_j
    return Customer(m.as_utc(row.created_at), None if None in before else (float(before[0]), float(before[1])))


@dataclass(frozen=True)
class TenantSubmitFacts:
    """What a batch of submits is checked against, per tenant."""

    zones: tuple[str, ...]  # the zones the tenant may run in (none: anywhere)
    deployments: int        # the tenant's deployments
    others_reserve: bool = False  # another tenant has a reservation: non-preemptible asks are checked alone


# Joins a tenant's names and request ids into one text column; neither can hold it
# (validation refuses control characters in both).
_JOINED = "\x1f"


@dataclass(frozen=True)
class SubmitBatchReads:
    """What a batch of submits is checked against (`submit_batch_reads`)."""

    tenants: dict[str, TenantSubmitFacts]  # the batch's tenants that exist
    taken: set[tuple[str, str]]            # (tenant, name): of the names asked, the deployments that exist
    used: set[tuple[str, str]]             # (tenant, request id): of the ids asked, those used before
    capacity_generation: int               # 0 when none exists
    # The ids the batch's new rows take, in order (`insert_deployments(ids=)`), one for each key
    # asked (none when none of the tenants exists). SQLite: from above every id the database ever
    # gave (AUTOINCREMENT's `sqlite_sequence`) or holds, as read: a batch that commits after another
    # took them fails on the primary key. PostgreSQL: taken from the table's sequence by the read
    # (`nextval`, never given back: ids of rows not written are never used).
    deployment_ids: Sequence[int] = ()


def tenant_deployments(tenant: Any) -> Any:
    """The deployments of `tenant` (a column or a value) as the database's triggers count them
    (`models.TenantDeploymentCount`, migration 0017): its row plus its deltas not folded yet (a
    scalar subquery; one snapshot with the statement it is in). Counting them scanned the tenant's
    deployments every submit batch."""
    kept = select(m.TenantDeploymentCount.deployments).where(m.TenantDeploymentCount.tenant_id == tenant)
    unfolded = select(func.sum(m.DeploymentCountDelta.deployments)).where(m.DeploymentCountDelta.tenant_id == tenant)
    return func.coalesce(kept.scalar_subquery(), 0) + func.coalesce(unfolded.scalar_subquery(), 0)


def _batch_reads_query(dialect: str) -> Select:
    """`submit_batch_reads`' query for `dialect`, its lists named `tenants`, `names`, `request_ids`."""
    def joined(column: object, where: list[object]) -> object:
        return select(func.aggregate_strings(column, _JOINED)).where(*where).correlate(m.Tenant).scalar_subquery()

    count = tenant_deployments(m.Tenant.id)
    generation = select(m.CapacityState.generation).where(m.CapacityState.id == 1).scalar_subquery()
    names = joined(m.Deployment.name, [m.Deployment.tenant_id == m.Tenant.id,
                                       any_of_named(dialect, m.Deployment.name, "names")])
    request_ids = joined(m.ClientRequest.request_id, [
        m.ClientRequest.tenant_id == m.Tenant.id, any_of_named(dialect, m.ClientRequest.request_id, "request_ids")])
    return (select(m.Tenant.id, m.Tenant.zones, count, generation, names, request_ids, _new_deployment_ids(dialect),
                   others_reserve(m.Tenant.id))
            .where(any_of_named(dialect, m.Tenant.id, "tenants")))


def others_reserve(tenant: Any) -> Any:
    """Whether a tenant other than `tenant` (a column or a parameter) reserves accelerators: an
    index-free look at the small tenants table, so a submit pays the reservation check
    (`usecases/reservations.py`) only in a cluster that has reservations."""
    others = aliased(m.Tenant)
    return select(others.id).where(others.reserved_accelerators > 0, others.id != tenant).exists()


def _new_deployment_ids(dialect: str) -> Any:
    """SQLite: the id AUTOINCREMENT would give the next deployment now (one above the largest it
    ever gave, kept in `sqlite_sequence`, or above the largest id held when that has no row yet);
    the table's primary key and `sqlite_sequence` (one row a table): no scan. PostgreSQL: `count`
    ids taken from the table's sequence (an uncorrelated subquery: run once, not once a tenant),
    joined in a text (an array of bigint would cost a type lookup on each new connection)."""
    table = m.Deployment.__table__
    if dialect == POSTGRESQL:
        taken = cast(func.nextval(func.pg_get_serial_sequence(table.name, "id")), Text)
        return (select(func.aggregate_strings(taken, ",")).select_from(func.generate_series(1, bindparam("count")))
                .scalar_subquery())
    ever = literal_column(f"(SELECT seq FROM sqlite_sequence WHERE name = '{table.name}')")
    held = select(func.max(table.c.id)).scalar_subquery()
    return func.max(func.coalesce(ever, 0), func.coalesce(held, 0)) + 1


_BATCH_READS = {dialect: _batch_reads_query(dialect) for dialect in ("sqlite", POSTGRESQL)}


async def submit_batch_reads(session: AsyncSession, keys: Iterable[tuple[str, str, str]]) -> SubmitBatchReads:
    """For a batch of submits (tenant, name, request id or ""), in ONE query: the facts of each
    tenant that exists, which of the names exist in their tenant, which request ids were used
    there, the capacity generation (0 when none exists) and the ids the batch's rows take: each
    round trip is a turn of a busy event loop."""
    keys = list(keys)
    tenants = sorted({tenant for tenant, _, _ in keys})
    facts: dict[str, TenantSubmitFacts] = {}
    taken: set[tuple[str, str]] = set()
    used: set[tuple[str, str]] = set()
    generation = 0
    ids: Sequence[int] = ()
    if tenants:
        dialect = dialect_of(session)
        params = {"tenants": tenants, "names": sorted({name for _, name, _ in keys}),
                  "request_ids": sorted({rid for _, _, rid in keys if rid})}
        if dialect == POSTGRESQL:
            params["count"] = len(keys)
        new_ids = None  # the batch's, the same on every tenant's row: parsed once below
        for tenant, zones, deployments, capacity_generation, names, request_ids, new_ids, reserve in \
                await session.execute(_BATCH_READS[dialect], params):
            facts[tenant] = TenantSubmitFacts(tuple(zones or ()), int(deployments), bool(reserve))
            taken.update((tenant, name) for name in (names or "").split(_JOINED) if name)
            used.update((tenant, rid) for rid in (request_ids or "").split(_JOINED) if rid)
            generation = int(capacity_generation or 0)
        if new_ids is not None:
            ids = ([int(i) for i in new_ids.split(",")] if dialect == POSTGRESQL
                   else range(int(new_ids), int(new_ids) + len(keys)))
    return SubmitBatchReads(facts, taken, used, generation, ids)


async def known_tenant_ids(session: AsyncSession) -> list[str]:
    """Every tenant id the cluster ever had, those deleted since included (`m.KnownTenant`)."""
    return list(await session.scalars(select(m.KnownTenant.id)))


async def list_tenant_rows(session: AsyncSession, page: PageBounds | None = None, *,
                           ids: Iterable[str] | None = None, lock: bool = False, fresh: bool = False) -> list[m.Tenant]:
    """The tenants (of `ids` only, when given), in ascending id. `lock`: their rows locked `FOR NO
    KEY UPDATE` (PostgreSQL), as a tenant's deletion locks those whose exclusions it rewrites
    before its DELETE's trigger takes isolation_state (store/changes.py's order: a tenant's update
    takes its row, then that). `fresh`: rows the session holds already are read again."""
    query = _paged(select(m.Tenant).order_by(m.Tenant.id), page, m.Tenant.id)
    if ids is not None:
        query = query.where(any_of(session, m.Tenant.id, set(ids)))
    if lock:
        query = query.with_for_update(key_share=True)
    if fresh:
        query = query.execution_options(populate_existing=True)
    return list(await session.scalars(query))


async def lock_tenant(session: AsyncSession, tenant_id: str) -> m.Tenant | None:
    """The tenant's row locked for its deletion (PostgreSQL `FOR UPDATE`: what refers to it, a
    deployment inserted, a token or an exclusion naming it (their key share: `existing_ids`),
    waits for the deletion, then finds it gone; one under way is waited for, then seen)."""
    return (await session.scalars(select(m.Tenant).where(m.Tenant.id == tenant_id).with_for_update())).one_or_none()


async def delete_tenant_row(session: AsyncSession, tenant_id: str) -> bool:
    """Delete the tenant's row (on SQLite its first write: the writer is held from here) and its
    client request ids (a new customer given the id later starts with none of them); False when
    deployments refer to it (their foreign key refused the DELETE: the transaction is done for)."""
    try:
        await session.execute(delete(m.Tenant).where(m.Tenant.id == tenant_id).execution_options(
            synchronize_session=False))
    except IntegrityError:
        return False
    await session.execute(delete(m.ClientRequest).where(m.ClientRequest.tenant_id == tenant_id))
    return True


async def count_tenant_deployments(session: AsyncSession, tenant_id: str) -> int:
    return int(await session.scalar(select(tenant_deployments(tenant_id))) or 0)


@dataclass(frozen=True, slots=True)
class PlacedBeside:
    """A placement on a rack where a tenant holds shards: its node, rack, zone and tenant."""

    node: str
    rack: str
    zone: str
    tenant: str


async def placed_beside(session: AsyncSession, tenant_id: str) -> list[PlacedBeside]:
    """Every tenant's placements (once per node and tenant) on the racks where `tenant_id` holds
    shards, its own included: what a stricter contract of its would have to keep apart."""
    racks = (select(m.Node.rack_id).join(m.Placement, m.Placement.node_id == m.Node.id)
             .join(m.Deployment, m.Deployment.id == m.Placement.deployment_id)
             .where(m.Deployment.tenant_id == tenant_id))
    rows = await session.execute(
        select(m.Node.id, m.Node.rack_id, m.Row.zone_id, m.Deployment.tenant_id).distinct()
        .select_from(m.Placement)
        .join(m.Deployment, m.Deployment.id == m.Placement.deployment_id)
        .join(m.Node, m.Node.id == m.Placement.node_id)
        .join(m.Rack, m.Rack.id == m.Node.rack_id)
        .join(m.Row, m.Row.id == m.Rack.row_id)
        .where(m.Node.rack_id.in_(racks))
        .order_by(m.Node.id, m.Deployment.tenant_id))
    return [PlacedBeside(*row) for row in rows]


def tenant_spec(row: m.Tenant) -> d.TenantSpec:
    return d.TenantSpec(
        id=row.id, isolation=row.isolation.value, excludes=tuple(row.excludes or ()),
        zones=tuple(row.zones or ()), reserved_accelerators=row.reserved_accelerators,
        max_accelerators=row.max_accelerators, max_power_w=row.max_power_w,
    )
