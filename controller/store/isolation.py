"""What the isolation watchdog reads: every stored placement with the facts its rules need.

Leaner than the reconciler's snapshot (`snapshot.load_snapshot`): plain columns, the JSON of
accelerator indices left as text, placements read in keyset pages so the event loop is never
held for long; `to_problem` (run in a worker thread) parses and builds the solver's model,
taking what it built at the last check for the rows unchanged since (`ModelMemo`).
Placements of deployments being deleted are included: they still hold their accelerators.
`isolation_version` reads the counter that database triggers (migration 0005) bump whenever a
row the rules read changes, however it was written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row as SqlRow
from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.values import deployment_key
from controller.store.models import Deployment, IsolationState, Node, Placement, Rack, Row, Tenant
from scheduler.model import Deployment as SolverDeployment
from scheduler.model import Node as SolverNode
from scheduler.model import Placement as SolverPlacement
from scheduler.model import Problem, Rack as SolverRack, Row as SolverRow, ShardSpec, Tenant as SolverTenant

PAGE = 1000  # rows per query: the event loop is never held for long


@dataclass(frozen=True)
class StoredPlacements:
    """Raw rows, as read (parsing and building happen in `to_problem`, off the event loop)."""

    rows: list[SqlRow[Any]]
    racks: list[SqlRow[Any]]
    nodes: list[SqlRow[Any]]
    tenants: list[SqlRow[Any]]
    deployments: list[SqlRow[Any]]
    placements: list[SqlRow[Any]]


async def read_placements(session: AsyncSession) -> StoredPlacements:
    """Every placement and what it refers to; placements in pages of `PAGE` rows."""
    async def rows(*columns: Any) -> list[SqlRow[Any]]:
        return list(await session.execute(select(*columns)))

    placements: list[SqlRow[Any]] = []
    after = 0
    while True:
        page = list(await session.execute(
            select(Placement.id, Placement.deployment_id, Placement.replica, Placement.shard, Placement.node_id,
                   cast(Placement.accelerator_indices, Text), Placement.accelerator_milli)
            .where(Placement.id > after).order_by(Placement.id).limit(PAGE)))
        placements += page
        if len(page) < PAGE:
            break
        after = page[-1][0]
    return StoredPlacements(
        rows=await rows(Row.id, Row.zone_id),
        racks=await rows(Rack.id, Rack.row_id),
        nodes=await rows(Node.id, Node.rack_id, Node.accelerators, Node.hbm_gib, Node.cpu_milli, Node.memory_mib),
        tenants=await rows(Tenant.id, Tenant.isolation, Tenant.excludes, Tenant.zones),
        deployments=await rows(Deployment.id, Deployment.name, Deployment.tenant_id, Deployment.shard_accelerators,
                               Deployment.shard_accelerator_milli, Deployment.shard_hbm_gib,
                               Deployment.shard_cpu_milli, Deployment.shard_memory_mib),
        placements=placements,
    )


async def isolation_version(session: AsyncSession) -> int:
    """The counter the database's triggers bump on every change the isolation rules read."""
    version = (await session.execute(select(IsolationState.version).where(IsolationState.id == 1))).scalar_one_or_none()
    if version is None:
        raise RuntimeError("isolation_state row id=1 is missing: is the schema migrated?")
    return version


class ModelMemo:
    """The solver objects `to_problem` built from each row at the last check, by that row's
    values (and a placement's by its deployment's label too): a row unchanged since is not
    parsed and built again. Under churn nearly every row is: at 4,096 nodes and ~12,000
    placements building them all took ~100 ms of CPU a check. Holds only what the last check used."""

    def __init__(self) -> None:
        self.deployments: dict[tuple[Any, ...], tuple[str, SolverDeployment]] = {}
        self.placements: dict[tuple[tuple[Any, ...], str], SolverPlacement] = {}
        self.nodes: dict[tuple[Any, ...], SolverNode] = {}


def to_problem(stored: StoredPlacements, memo: ModelMemo | None = None) -> Problem:
    """The solver's model of the stored placements (CPU work: call it in a worker thread); with
    `memo`, the objects of rows unchanged since its last use are taken from it (and it holds
    this call's)."""
    memo = memo or ModelMemo()
    deployments: dict[tuple[Any, ...], tuple[str, SolverDeployment]] = {}
    labels: dict[int, str] = {}  # violations name TENANT/NAME
    for d in stored.deployments:
        values = tuple(d)  # plain tuples: a Row compares in Python, ~4x slower
        deployments[values] = built = memo.deployments.get(values) or _deployment(d)
        labels[d.id] = built[0]
    placements: dict[tuple[tuple[Any, ...], str], SolverPlacement] = {}
    for p in stored.placements:
        key = (tuple(p), labels.get(p[1], f"deployment #{p[1]}"))
        placements[key] = memo.placements.get(key) or SolverPlacement(
            key[1], p[2], p[3], p[4], tuple(json.loads(p[5])), p[6])
    nodes: dict[tuple[Any, ...], SolverNode] = {}
    for n in stored.nodes:
        values = tuple(n)
        nodes[values] = memo.nodes.get(values) or SolverNode(
            n.id, n.rack_id, n.accelerators, hbm_gib=n.hbm_gib, cpu_milli=n.cpu_milli, memory_mib=n.memory_mib)
    memo.deployments, memo.placements, memo.nodes = deployments, placements, nodes
    return Problem(
        zones=(),
        rows=tuple(SolverRow(r.id, r.zone_id) for r in stored.rows),
        racks=tuple(SolverRack(r.id, r.row_id) for r in stored.racks),
        nodes=tuple(nodes.values()),
        tenants=tuple(SolverTenant(t.id, t.isolation.value, tuple(t.excludes), tuple(t.zones) or None)
                      for t in stored.tenants),
        deployments=tuple(deployment for _, deployment in deployments.values()),
        placements=tuple(placements.values()),
    )


def _deployment(d: SqlRow[Any]) -> tuple[str, SolverDeployment]:
    label = deployment_key(d.tenant_id, d.name)
    return label, SolverDeployment(label, d.tenant_id, 1, 1, ShardSpec(
        d.shard_accelerators, d.shard_accelerator_milli, d.shard_hbm_gib, d.shard_cpu_milli, d.shard_memory_mib))
