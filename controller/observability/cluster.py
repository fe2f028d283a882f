"""The cluster's state as numbers for gauges: one read of the database, at scrape time.

`read_cluster_gauges` runs in the controller's event loop (the metrics endpoint asks the loop
for it) and costs a handful of aggregate queries whatever the cluster size: placements are
summed by the database per (node, tenant) through `repositories.cluster_usage`. The per-row
reads (every deployment's reasons, every node) come in partitions (`store.partitions`), each
decoded and counted in its own turn of the loop. Every label it
produces is bounded by configuration (tenants, racks, rows, zones, accelerator models, phases,
reason codes); never a deployment name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.liveness import later_contact
from controller.store import metering
from controller.store import models as m
from controller.store import repositories as repo
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
    # Metered usage per (tenant, model, zone): (accelerator-seconds, joules), up to the read.
    usage: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)


async def read_cluster_gauges(session: AsyncSession, *, now: datetime | None = None,
                              heard: Mapping[str, datetime] | None = None) -> ClusterGauges:
    """`heard`: when the nodes whose streams this controller holds (or held) were last heard from,
    later than their stored last heartbeat (written only every few heartbeat timeouts meanwhile)."""
    now = now or datetime.now(timezone.utc)
    placed = await repo.cluster_usage(session)
    phases = {phase.value: 0 for phase in m.DeploymentPhase}
    phases.update(await repo.count_deployments_by_phase(session))

    unplaced: dict[str, int] = defaultdict(int)
    async for part in partitions(session, select(m.Deployment.reasons)):
        for (reasons,) in part:
            for code in {r.get("code", "") for r in reasons or () if r.get("code")}:
                unplaced[code] += 1

    zone_of_row: dict[str, str] = {}
    rows_budget: dict[str, float | None] = {}
    for row_id, zone_id, budget in await session.execute(select(m.Row.id, m.Row.zone_id, m.Row.power_budget_w)):
        zone_of_row[row_id], rows_budget[row_id] = zone_id, budget
    racks_budget: dict[str, tuple[str, float | None]] = {
        rack_id: (row_id, budget)
        for rack_id, row_id, budget in await session.execute(select(m.Rack.id, m.Rack.row_id, m.Rack.power_budget_w))
    }

    states = {"ready": 0, "cordoned": 0, "suspect": 0, "down": 0}
    lag: dict[str, float] = {}
    draw: dict[str, float] = defaultdict(float)
    free: dict[tuple[str, str], float] = defaultdict(float)
    model_of: dict[str, str] = {}
    nodes = select(
        m.Node.id, m.Node.rack_id, m.Node.accelerators, m.Node.accelerator_model, m.Node.health, m.Node.cordoned,
        m.Node.last_heartbeat_at, m.Node.power_draw_w,
    )
    async for part in partitions(session, nodes):
        for node_id, rack_id, accelerators, model, health, cordoned, last_beat, draw_w in part:
            model_of[node_id] = model
            down = health is m.NodeHealth.DOWN
            state = health.value if health is not m.NodeHealth.UP else "cordoned" if cordoned else "ready"
            states[state] += 1
            if down:
                continue
            draw[rack_id] += draw_w or 0.0
            last_beat = later_contact(last_beat, (heard or {}).get(node_id))
            if last_beat is not None:
                lag[rack_id] = max(lag.get(rack_id, 0.0), max(0.0, (now - last_beat).total_seconds()))
            if state == "ready":
                zone = zone_of_row.get(racks_budget.get(rack_id, ("", None))[0], "")
                free[(model, zone)] += max(0, accelerators * 1000 - placed.node_milli.get(node_id, 0)) / 1000.0

    allocated: dict[tuple[str, str], float] = defaultdict(float)
    for (node_id, tenant_id), milli in placed.node_tenant_milli.items():
        allocated[(tenant_id, model_of.get(node_id, ""))] += milli / 1000.0

    racks = tuple(
        PowerDomain(rack_id, row_id, placed.rack_power_w.get(rack_id, 0.0), budget, draw.get(rack_id, 0.0))
        for rack_id, (row_id, budget) in sorted(racks_budget.items())
    )
    rows = tuple(
        PowerDomain(row_id, zone_of_row[row_id], placed.row_power_w.get(row_id, 0.0), budget)
        for row_id, budget in sorted(rows_budget.items())
    )
    metered = {
        (t.tenant, t.accelerator_model, t.zone): (t.accelerator_seconds, t.energy_j)
        for t in await metering.usage_by(session, ("tenant", "accelerator_model", "zone"), now=now)
    }
    return ClusterGauges(
        deployments_by_phase=phases, unplaced_by_reason=dict(unplaced), nodes_by_state=states,
        heartbeat_lag_max_s=lag, racks=racks, rows=rows, allocated=dict(allocated), free=dict(free), usage=metered,
    )


