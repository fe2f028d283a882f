"""The cluster's state as numbers for gauges: one read of the database, at scrape time.

`read_cluster_gauges` runs in the controller's event loop (the metrics endpoint asks the loop
for it); the usage counters are a read of their own (`read_usage_counters`), so that a slow one
leaves the other gauges in the scrape. Every sum is the database's (GROUP BY): a scrape decodes
a row per group (phase, node state, rack, (tenant, model), (model, zone)), not a row per
deployment, node or placement, and SQLite scans in its own thread, without the GIL. Two reads
stay per row, and narrow: the deployments that carry reasons (the unplaced: those with none are
left out by the database) and the up nodes' last heartbeats (their lag is the later of the
stored time and what this controller heard itself, `AgentHub.last_heard`), in partitions
(`store.partitions`), each its own turn of the loop. At 4,096 nodes and 10,000 placements a
scrape read every deployment's reasons, every node and a sum per (node, tenant) on the loop:
36-62 ms windows at 50 submits/s (issue 8). Every label it produces is bounded by configuration
(tenants, racks, rows, zones, accelerator models, phases, reason codes); never a deployment
name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import String, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.liveness import later_contact
from controller.store import metering
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.repositories import PLACEMENT_MILLI
from controller.store.partitions import partitions

@dataclass(frozen=True, slots=True)
class PowerDomain:
    """One rack or row: placed power (idle + shards, what the budget bounds) and the budget."""

    id: str
    parent: str  # the rack's row, the row's zone
    used_w: float
    budget_w: float | None
    draw_w: float = 0.0  # what the agents last reported (racks only)


@dataclass(frozen=True)
class ClusterGauges:
    deployments_by_phase: dict[str, int] = field(default_factory=dict)
    # Deployments with unplaced replicas, counted once under each reason code they carry.
    unplaced_by_reason: dict[str, int] = field(default_factory=dict)
    nodes_by_state: dict[str, int] = field(default_factory=dict)
    # Largest time since the last heartbeat among a rack's up nodes.
    heartbeat_lag_max_s: dict[str, float] = field(default_factory=dict)
    racks: tuple[PowerDomain, ...] = ()
    rows: tuple[PowerDomain, ...] = ()
    # Accelerators held (fractions as such) per (tenant, model); free on ready nodes per (model, zone).
    allocated: dict[tuple[str, str], float] = field(default_factory=dict)
    free: dict[tuple[str, str], float] = field(default_factory=dict)


async def read_cluster_gauges(session: AsyncSession, *, now: datetime | None = None,
                              heard: Mapping[str, datetime] | None = None, lag: bool = True) -> ClusterGauges:
    """`heard`: when the nodes whose streams this controller holds (or held) were last heard from,
    later than their stored last heartbeat (written only every few heartbeat timeouts meanwhile).
    `lag`: read the heartbeat lag; only the leader, which holds the agents' streams, knows it (a
    follower has only the stored heartbeats, up to three timeouts old: its lag would saw-tooth
    up to 3x --heartbeat-timeout, and a dashboard's `max by (rack)` would show that)."""
    now = now or datetime.now(timezone.utc)
    phases = {phase.value: 0 for phase in m.DeploymentPhase}
    phases.update(await repo.count_deployments_by_phase(session))
    unplaced = await _unplaced_by_reason(session)

    zone_of_row: dict[str, str] = {}
    rows_budget: dict[str, float | None] = {}
    for row_id, zone_id, budget in await session.execute(select(m.Row.id, m.Row.zone_id, m.Row.power_budget_w)):
        zone_of_row[row_id], rows_budget[row_id] = zone_id, budget
    racks_budget: dict[str, tuple[str, float | None]] = {
        rack_id: (row_id, budget)
        for rack_id, row_id, budget in await session.execute(select(m.Rack.id, m.Rack.row_id, m.Rack.power_budget_w))
    }

    states = await _nodes_by_state(session)
    used, draw = await repo.rack_power(session)
    row_used: dict[str, float] = defaultdict(float)
    for rack_id, watts in used.items():
        row_used[racks_budget[rack_id][0] if rack_id in racks_budget else ""] += watts
    racks = tuple(
        PowerDomain(rack_id, row_id, used.get(rack_id, 0.0), budget, draw.get(rack_id, 0.0))
        for rack_id, (row_id, budget) in sorted(racks_budget.items())
    )
    rows = tuple(
        PowerDomain(row_id, zone_of_row[row_id], row_used.get(row_id, 0.0), budget)
        for row_id, budget in sorted(rows_budget.items())
    )
    return ClusterGauges(
        deployments_by_phase=phases, unplaced_by_reason=unplaced, nodes_by_state=states,
        heartbeat_lag_max_s=await _heartbeat_lag(session, now, heard or {}) if lag else {}, racks=racks, rows=rows,
        allocated=await _allocated(session), free=await _free(session),
    )


# Metered usage per (tenant, model, zone): (accelerator-seconds, joules), up to the read.
UsageCounters = dict[tuple[str, str, str], tuple[float, float]]


async def read_usage_counters(session: AsyncSession, *, now: datetime | None = None) -> UsageCounters:
    """The usage meter's counters, a read of their own (the metrics endpoint runs it beside
    `read_cluster_gauges`, with its own timeout): the closed intervals' sums and the open ones'
    accrual (`metering.usage_to_date`), never the history."""
    return {
        (t.tenant, t.accelerator_model, t.zone): (t.accelerator_seconds, t.energy_j)
        for t in await metering.usage_to_date(session, ("tenant", "accelerator_model", "zone"),
                                              now=now or datetime.now(timezone.utc))
    }


# What an empty list of reasons (the default) reads as, as text; those rows count under no code.
_NO_REASONS = ("[]", "null")


async def _unplaced_by_reason(session: AsyncSession) -> dict[str, int]:
    """Deployments with reasons, counted once under each code they carry (only those rows read)."""
    unplaced: dict[str, int] = defaultdict(int)
    with_reasons = select(m.Deployment.reasons).where(cast(m.Deployment.reasons, String).not_in(_NO_REASONS))
    async for part in partitions(session, with_reasons):
        for (reasons,) in part:
            for code in {r.get("code", "") for r in reasons or () if r.get("code")}:
                unplaced[code] += 1
    return dict(unplaced)


def _is_up() -> Any:
    return m.Node.health != m.NodeHealth.DOWN


async def _nodes_by_state(session: AsyncSession) -> dict[str, int]:
    """Nodes by state: ready, cordoned (up and cordoned), suspect, down."""
    states = {"ready": 0, "cordoned": 0, "suspect": 0, "down": 0}
    counted = select(m.Node.health, m.Node.cordoned, func.count()).group_by(m.Node.health, m.Node.cordoned)
    for health, cordoned, count in await session.execute(counted):
        state = health.value if health is not m.NodeHealth.UP else "cordoned" if cordoned else "ready"
        states[state] += int(count)
    return states


async def _allocated(session: AsyncSession) -> dict[tuple[str, str], float]:
    """Accelerators held by placed shards per (tenant, accelerator model of their node)."""
    held = (select(m.Deployment.tenant_id, m.Node.accelerator_model, func.sum(PLACEMENT_MILLI))
            .select_from(m.Placement).join(m.Deployment).join(m.Node)
            .group_by(m.Deployment.tenant_id, m.Node.accelerator_model))
    return {(tenant, model): int(milli) / 1000.0 for tenant, model, milli in await session.execute(held)}


async def _free(session: AsyncSession) -> dict[tuple[str, str], float]:
    """Accelerators not held on ready nodes (up, not cordoned) per (model, zone); a node holding
    more than it has counts as none free."""
    held = (select(m.Placement.node_id.label("node_id"), func.sum(PLACEMENT_MILLI).label("milli"))
            .join(m.Deployment).group_by(m.Placement.node_id).subquery())
    left = m.Node.accelerators * 1000 - func.coalesce(held.c.milli, 0)
    free = (select(m.Node.accelerator_model, m.Row.zone_id, func.sum(case((left > 0, left), else_=0)))
            .select_from(m.Node).join(m.Rack).join(m.Row).outerjoin(held, held.c.node_id == m.Node.id)
            .where(m.Node.health == m.NodeHealth.UP, m.Node.cordoned.is_(False))
            .group_by(m.Node.accelerator_model, m.Row.zone_id))
    return {(model, zone): int(milli) / 1000.0 for model, zone, milli in await session.execute(free)}


async def _heartbeat_lag(session: AsyncSession, now: datetime, heard: Mapping[str, datetime]) -> dict[str, float]:
    """Per rack, the longest time since an up node's last contact (stored or heard here)."""
    lag: dict[str, float] = {}
    beats = select(m.Node.id, m.Node.rack_id, m.Node.last_heartbeat_at).where(_is_up())
    async for part in partitions(session, beats):
        for node_id, rack_id, last_beat in part:
            contact = later_contact(last_beat, heard.get(node_id))
            if contact is not None:
                lag[rack_id] = max(lag.get(rack_id, 0.0), max(0.0, (now - contact).total_seconds()))
    return lag
