"""The cluster's state as numbers for gauges: one read of the database, at scrape time.

`read_cluster_gauges` runs in the controller's event loop (the metrics endpoint asks the loop
for it); the usage counters are a read of their own (`read_usage_counters`), so that a slow one
leaves the other gauges in the scrape. Every sum is the database's (GROUP BY): a scrape decodes
a row per group (phase, node state, rack, (tenant, model), (model, zone)), not a row per
deployment, node or placement, and SQLite scans in its own thread, without the GIL. Three reads
stay per row, and narrow: the deployments that carry reasons (those with none are left out by
the database) with a shard count per placed replica of theirs (a reason counts only while
replicas are unplaced), and the up nodes' last heartbeats (their lag is the later of the
stored time and what this controller heard itself, `AgentHub.last_heard`), in partitions
(`store.partitions`), each its own turn of the loop. At 4,096 nodes and 10,000 placements a
scrape read every deployment's reasons, every node and a sum per (node, tenant) on the loop:
36-62 ms windows at 50 submits/s (issue 8). Every label it produces is bounded by configuration
(tenants, racks, rows, zones, accelerator models, phases, reason codes); never a deployment
name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
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
    # Deployments with unplaced replicas (placed < replicas), counted once under each reason code they carry.
    unplaced_by_reason: dict[str, int] = field(default_factory=dict)
    nodes_by_state: dict[str, int] = field(default_factory=dict)
    # Largest time since the last heartbeat among a rack's up nodes.
    heartbeat_lag_max_s: dict[str, float] = field(default_factory=dict)
    racks: tuple[PowerDomain, ...] = ()
    rows: tuple[PowerDomain, ...] = ()
    # Accelerators held (fractions as such) per (tenant, model); free on ready nodes per (model, zone).
    allocated: dict[tuple[str, str], float] = field(default_factory=dict)
    free: dict[tuple[str, str], float] = field(default_factory=dict)
    # Per tenant with a reservation: the accelerators reserved and not held while it has
    # non-preemptible work waiting (0 while it waits for nothing): a reservation not honoured.
    reservation_short: dict[str, float] = field(default_factory=dict)
    # Failed accelerators (usecases/faults.py) per (node, rack): only nodes with some.
    failed: dict[tuple[str, str], int] = field(default_factory=dict)

    def follower_view(self) -> ClusterGauges:
        """These gauges without the leader's own: the heartbeat lag, which only the controller
        holding the agents' streams knows (`read_cluster_gauges`' `lag`). Every other field is
        read from the shared database, the same on any controller, follower or not."""
        return replace(self, heartbeat_lag_max_s={}) if self.heartbeat_lag_max_s else self


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
    unplaced, waiting_tenants = await _unplaced_by_reason(session)

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
    failed, failed_free = await _failed(session)
    free = await _free(session)
    for key, count in failed_free.items():  # not held (their shards are released), and not free either
        free[key] = max(0.0, free.get(key, 0.0) - count)
    return ClusterGauges(
        deployments_by_phase=phases, unplaced_by_reason=unplaced, nodes_by_state=states,
        heartbeat_lag_max_s=await _heartbeat_lag(session, now, heard or {}) if lag else {}, racks=racks, rows=rows,
        allocated=await _allocated(session), free=free, failed=failed,
        reservation_short={tenant: max(0.0, reserved - held) if tenant in waiting_tenants else 0.0
                           for tenant, (reserved, held) in (await repo.reserved_usage(session)).items()},
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


async def _unplaced_by_reason(session: AsyncSession) -> tuple[dict[str, int], set[str]]:
    """Deployments with fewer replicas placed than asked, counted once under each reason code they
    carry (only the rows of deployments with reasons read, and a count per placed replica of
    theirs), and the tenants of those not preemptible that wait for capacity (what a reservation
    is for; not a quarantined or failed one, which waits for its owner: `repo.WAITS_FOR_NO_CAPACITY`,
    as admission counts them). A deployment
    placed in full may still carry a reason (SHARD_FAILED after its failed replica was placed
    again, PREEMPTED ...): it has no unplaced replica, so it is not counted. A
    replica is placed when every shard of it is, of the revision it was placed for (as a
    deployment's `placed_replicas` counts it, `domain.phases.replica_counts`); a deleting
    deployment waits for no placement."""
    waiting = (cast(m.Deployment.reasons, String).not_in(_NO_REASONS),
               m.Deployment.phase != m.DeploymentPhase.DELETING)
    shards: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # (replica, revision, shards placed)
    placed_shards = (select(m.Placement.deployment_id, m.Placement.replica, m.Placement.revision, func.count())
                     .join(m.Deployment).where(*waiting)
                     .group_by(m.Placement.deployment_id, m.Placement.replica, m.Placement.revision))
    async for part in partitions(session, placed_shards):
        for deployment_id, replica, revision, count in part:
            shards[deployment_id].append((replica, revision, int(count)))
    unplaced: dict[str, int] = defaultdict(int)
    tenants: set[str] = set()
    with_reasons = select(m.Deployment.id, m.Deployment.replicas, m.Deployment.shards_per_replica,
                          m.Deployment.template_revision, m.Deployment.revision_specs, m.Deployment.reasons,
                          m.Deployment.tenant_id, m.Deployment.preemptible, m.Deployment.phase).where(*waiting)
    async for part in partitions(session, with_reasons):
        for (deployment_id, replicas, shards_per_replica, revision, revision_specs, reasons, tenant, preemptible,
             phase) in part:
            if _placed_replicas(shards.get(deployment_id, ()), shards_per_replica, revision,
                                revision_specs) >= replicas:
                continue
            for code in {r.get("code", "") for r in reasons or () if r.get("code")}:
                unplaced[code] += 1
            if not preemptible and phase not in repo.WAITS_FOR_NO_CAPACITY:
                tenants.add(tenant)
    return dict(unplaced), tenants


def _placed_replicas(shards: Iterable[tuple[int, int, int]], shards_per_replica: int, revision: int,
                     revision_specs: Mapping[str, Any] | None) -> int:
    """Replicas with every shard placed, from (replica, revision, shards placed) counts; an older
    revision's replica (a rolling update's outgoing one) has that revision's shard count."""
    placed: dict[int, int] = defaultdict(int)
    size: dict[int, int] = {}
    for replica, shard_revision, count in shards:
        placed[replica] += count
        doc = None if shard_revision == revision else (revision_specs or {}).get(str(shard_revision))
        size[replica] = shards_per_replica if doc is None else int(doc["shards_per_replica"])
    return sum(1 for replica, count in placed.items() if count >= size[replica])


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


async def _failed(session: AsyncSession) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Failed accelerators per (node, rack), and those of ready nodes per (model, zone): the few
    nodes whose column is not NULL, read as rows. An index the node no longer has is not counted."""
    by_node: dict[tuple[str, str], int] = {}
    on_ready: dict[tuple[str, str], int] = defaultdict(int)
    rows = await session.execute(
        select(m.Node.id, m.Node.rack_id, m.Node.accelerator_model, m.Row.zone_id, m.Node.accelerators,
               m.Node.failed_accelerators, m.Node.health, m.Node.cordoned)
        .select_from(m.Node).join(m.Rack).join(m.Row).where(m.Node.failed_accelerators.is_not(None)))
    for node_id, rack_id, model, zone, accelerators, faults, health, cordoned in rows:
        count = len(repo.stored_faults(faults, accelerators))
        if not count:
            continue
        by_node[(node_id, rack_id)] = count
        if health is m.NodeHealth.UP and not cordoned:
            on_ready[(model, zone)] += count
    return by_node, dict(on_ready)


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
