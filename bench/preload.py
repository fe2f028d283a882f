"""A database preloaded with a cluster and its running work, written straight into the store.

Reaching "4,096 nodes holding 10,000 placements" through the API costs as long as the system
is slow (the very thing measured); the benchmarks start from it instead. `preload` migrates a
fresh database and inserts, in a few bulk statements, the topology, the nodes exactly as the
`maia-simnode` fleets describe themselves (same ids, same capacity: they register as existing
nodes, no capacity change), tenants, and single-shard node-local deployments RUNNING on them,
one accelerator each, spread round-robin over the nodes. Node ids come from the simnode fleet's
own naming (`FleetShape.node_specs`) so the two never drift apart.

The nodes are written DOWN (not evicted: they keep their shards) when agents will join, so
"nodes ready" counts the ones whose agent connected; UP (heartbeating "now") when none will
(the submit benchmark). Either way the controller's restart grace (`restart_grace_s`) holds
off the node lifecycle while the fleets join.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from controller.simnode.fleet import FleetShape
from controller.simnode.protocol import NodeSpec
from controller.store import models as m
from controller.store.db import Database
from controller.store.migrate import ensure_schema

RACKS_PER_ROW = 8
ROWS_PER_ZONE = 4
PRELOADED_PER_TENANT = 400  # under limits.DEPLOYMENTS_PER_TENANT_MAX
PRELOAD_PREFIX = "pre-"


@dataclass(frozen=True)
class Layout:
    """Zones > rows > racks > nodes of fleets of racks of `nodes_per_rack` nodes."""

    fleet_racks: tuple[tuple[str, int], ...]  # (rack prefix, racks) per simnode process
    nodes_per_rack: int

    def nodes(self) -> list[NodeSpec]:
        return [spec for prefix, racks in self.fleet_racks
                for spec in FleetShape(racks, self.nodes_per_rack, rack_prefix=prefix).node_specs()]

    def racks(self) -> list[str]:
        return list(dict.fromkeys(n.rack for n in self.nodes()))

    def rows(self) -> dict[str, str]:
        """row -> zone"""
        count = math.ceil(len(self.racks()) / RACKS_PER_ROW)
        return {f"row-{i:03d}": f"zone-{i // ROWS_PER_ZONE}" for i in range(count)}

    def rack_rows(self) -> dict[str, str]:
        """rack -> row"""
        rows = list(self.rows())
        return {rack: rows[i // RACKS_PER_ROW] for i, rack in enumerate(self.racks())}


def preload_tenants(placements: int) -> list[str]:
    return [f"bulk-{i:03d}" for i in range(math.ceil(placements / PRELOADED_PER_TENANT))]


async def preload(url: str, layout: Layout, *, placements: int, tenants: list[str], nodes_up: bool = False) -> None:
    """Migrate `url` and write the cluster, `tenants` (shared isolation) and `placements` running
    single-shard deployments (of `preload_tenants`, also created); the nodes DOWN until their
    agents connect, or UP (`nodes_up`)."""
    nodes = layout.nodes()
    accelerators = sum(n.accelerators for n in nodes)
    if placements > accelerators:
        raise ValueError(f"{placements} placements do not fit on {accelerators} accelerators")
    db = Database(url)
    try:
        await ensure_schema(db, migrate=True)
        bulk = preload_tenants(placements)
        async with db.unit_of_work() as uow:
            s = uow.session
            rows = layout.rows()
            await s.execute(insert(m.Zone), [{"id": z} for z in dict.fromkeys(rows.values())])
            await s.execute(insert(m.Row), [{"id": r, "zone_id": z} for r, z in rows.items()])
            await s.execute(insert(m.Rack), [{"id": k, "row_id": r} for k, r in layout.rack_rows().items()])
            now = m.utcnow()
            await s.execute(insert(m.Node), [
                {"id": n.node_id, "hostname": n.node_id, "rack_id": n.rack, "accelerators": n.accelerators,
                 "accelerator_model": n.accelerator_model, "hbm_gib": n.hbm_gib, "cpu_milli": n.cpu_milli,
                 "memory_mib": n.memory_mib, "idle_power_w": n.idle_power_w,
                 "labels": {"maia.dev/simulated": "true"}, "agent_version": n.agent_version,
                 "health": m.NodeHealth.UP if nodes_up else m.NodeHealth.DOWN, "last_heartbeat_at": now,
                 "assignment_generation": 1}
                for n in nodes])
            await s.execute(insert(m.Tenant), [{"id": t, "isolation": m.Isolation.SHARED}
                                               for t in dict.fromkeys([*tenants, *bulk])])
            if placements:
                await _running_work(s, nodes, bulk, placements)
            await uow.commit()
        if not db.is_sqlite:
            # The statistics a running cluster's autovacuum keeps: without them the planner guesses
            # from the tables' pages, and until autovacuum's next round (a minute) joins the
            # placements of a dozen deployments by hashing every one of them.
            async with db.engine.connect() as conn:
                await conn.execute(text("ANALYZE"))
                await conn.commit()
    finally:
        await db.dispose()


async def _running_work(s: AsyncSession, nodes: list[NodeSpec], tenants: list[str], count: int) -> None:
    """`count` single-shard deployments, each RUNNING on one accelerator, round-robin over nodes."""
    names = [f"{PRELOAD_PREFIX}{i:06d}" for i in range(count)]
    await s.execute(insert(m.Deployment), [
        {"name": name, "tenant_id": tenants[i // PRELOADED_PER_TENANT], "replicas": 1, "min_replicas": 1,
         "shards_per_replica": 1, "shard_accelerators": 1, "shard_hbm_gib": 16.0, "shard_power_w": 300.0,
         "shard_accelerator_models": [], "locality": m.Domain.NODE, "phase": m.DeploymentPhase.RUNNING,
         "reasons": [], "generation": 1, "revision_specs": {}}
        for i, name in enumerate(names)])
    ids = dict((await s.execute(select(m.Deployment.name, m.Deployment.id)
                                .where(m.Deployment.name.startswith(PRELOAD_PREFIX)))).all())
    await s.execute(insert(m.Placement), [
        {"deployment_id": ids[name], "replica": 0, "shard": 0, "node_id": nodes[i % len(nodes)].node_id,
         "accelerator_indices": [i // len(nodes)], "phase": m.ShardPhase.RUNNING, "generation": 1}
        for i, name in enumerate(names)])
