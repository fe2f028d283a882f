"""What the isolation watchdog reads: the stored placements and the facts its rules need.

Leaner than the reconciler's snapshot (`snapshot.load_snapshot`): plain columns as tuples, the
JSON of accelerator indices left as text (the view parses a row once, `isolation_view`).
Placements of deployments being deleted are included: they still hold their accelerators.

Two ways to read: every row, in keyset pages (`pages`: the watchdog's full pass folds each page
into its view and lets it go, so neither the event loop nor the young generation holds a whole
table's rows at once), or only the rows around what the change log names (`read_around`: some
deployments and nodes, their placements and the deployments those name). The small tables
(rows, racks, tenants: `read_contracts`) are read whole every check. `isolation_version` reads
the counter that database triggers (migration 0005) bump whenever a row the rules read changes,
however it was written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.values import deployment_key, split_deployment_key
from controller.store.inlist import any_of
from controller.store.models import ClusterState, Deployment, IsolationState, Node, Placement, Rack, Row, Tenant

PAGE = 1000  # rows per query: the event loop is never held for long, nor a whole table kept

Values = tuple[Any, ...]  # one row's columns, in the order of the column tuples below

# (id, deployment id, replica, shard, node id, accelerator indices as JSON text, accelerator milli,
# the deployment revision it was placed with)
PLACEMENT_COLUMNS: tuple[ColumnElement[Any], ...] = (
    Placement.id, Placement.deployment_id, Placement.replica, Placement.shard, Placement.node_id,  # type: ignore[assignment]
    cast(Placement.accelerator_indices, Text), Placement.accelerator_milli, Placement.revision)
# (id, name, tenant id, shard accelerators, accelerator milli, HBM GiB, CPU milli, memory MiB,
# template revision, older revisions' specs still running: a rollout's outgoing replicas)
DEPLOYMENT_COLUMNS: tuple[ColumnElement[Any], ...] = (
    Deployment.id, Deployment.name, Deployment.tenant_id, Deployment.shard_accelerators,  # type: ignore[assignment]
    Deployment.shard_accelerator_milli, Deployment.shard_hbm_gib, Deployment.shard_cpu_milli,
    Deployment.shard_memory_mib, Deployment.template_revision, Deployment.revision_specs)
# (id, rack id, accelerators, HBM GiB, CPU milli, memory MiB)
NODE_COLUMNS: tuple[ColumnElement[Any], ...] = (
    Node.id, Node.rack_id, Node.accelerators, Node.hbm_gib, Node.cpu_milli, Node.memory_mib)  # type: ignore[assignment]

_IN_CHUNK = 500  # values per IN list


@dataclass(frozen=True)
class Contracts:
    """The small tables, whole: rows (id, zone), racks (id, row), tenants (id, isolation, excludes, zones)."""

    rows: list[Values]
    racks: list[Values]
    tenants: list[Values]


@dataclass(frozen=True)
class Around:
    """The rows read again around what changed: `deployment_keys` and `node_ids` as asked (one
    asked and not found is gone), the deployments found (those asked, and those the placements
    read name), the nodes found, and the placements of those deployments and on those nodes."""

    deployment_keys: frozenset[str]
    node_ids: frozenset[str]
    deployments: list[Values]
    nodes: list[Values]
    placements: list[Values]

    @property
    def rows(self) -> int:
        return len(self.deployments) + len(self.nodes) + len(self.placements)


async def read_contracts(session: AsyncSession) -> Contracts:
    async def rows(*columns: Any) -> list[Values]:
        return [tuple(r) for r in await session.execute(select(*columns))]

    return Contracts(rows=await rows(Row.id, Row.zone_id), racks=await rows(Rack.id, Rack.row_id),
                     tenants=await rows(Tenant.id, Tenant.isolation, Tenant.excludes, Tenant.zones))


async def pages(session: AsyncSession, columns: Sequence[ColumnElement[Any]]) -> AsyncIterator[list[Values]]:
    """Every row of `columns`' table in pages of `PAGE`, by its key (the first column)."""
    key = columns[0]
    after: Any = None
    while True:
        statement = select(*columns).order_by(key).limit(PAGE)
        if after is not None:
            statement = statement.where(key > after)
        page = [tuple(r) for r in await session.execute(statement)]
        if page:
            yield page
        if len(page) < PAGE:
            return
        after = page[-1][0]


async def read_around(session: AsyncSession, deployment_keys: Collection[str] = (),
                      node_ids: Collection[str] = ()) -> Around:
    """The rows around `deployment_keys` (TENANT/NAME) and `node_ids` (see `Around`)."""
    deployments: dict[int, Values] = {}
    wanted = set(deployment_keys)
    names = [split_deployment_key(k) for k in sorted(wanted)]
    for chunk in _chunks(names):
        for d in await session.execute(select(*DEPLOYMENT_COLUMNS).where(
                any_of(session, Deployment.tenant_id, sorted({t for t, _ in chunk})),
                any_of(session, Deployment.name, sorted({n for _, n in chunk})))):
            if deployment_key(d[2], d[1]) in wanted:
                deployments[d[0]] = tuple(d)
    placements: dict[int, Values] = {}
    for column, values in ((Placement.deployment_id, sorted(deployments)), (Placement.node_id, sorted(node_ids))):
        for chunk in _chunks(values):
            for p in await session.execute(select(*PLACEMENT_COLUMNS).where(any_of(session, column, chunk))):
                placements[p[0]] = tuple(p)
    named = sorted({p[1] for p in placements.values()} - deployments.keys())
    for chunk in _chunks(named):
        for d in await session.execute(select(*DEPLOYMENT_COLUMNS).where(any_of(session, Deployment.id, chunk))):
            deployments[d[0]] = tuple(d)
    nodes: list[Values] = []
    for chunk in _chunks(sorted(node_ids)):
        nodes += [tuple(n) for n in await session.execute(select(*NODE_COLUMNS).where(any_of(session, Node.id, chunk)))]
    return Around(frozenset(wanted), frozenset(node_ids), list(deployments.values()), nodes, list(placements.values()))


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start:start + _IN_CHUNK]


async def isolation_version(session: AsyncSession) -> int:
    """The counter the database's triggers bump on every change the isolation rules read."""
    return (await read_versions(session))[0]


_VERSIONS = select(select(IsolationState.version).where(IsolationState.id == 1).scalar_subquery(),
                   select(ClusterState.generation).where(ClusterState.id == 1).scalar_subquery())


async def read_versions(session: AsyncSession) -> tuple[int, int]:
    """The isolation version and the cluster generation (`store.changes`), in one statement: when
    the version has not moved, the rows the rules read are as they were at any generation since."""
    row = (await session.execute(_VERSIONS)).one()
    if row[0] is None or row[1] is None:
        raise RuntimeError("isolation_state or cluster_state row id=1 is missing: is the schema migrated?")
    return int(row[0]), int(row[1])
