"""Test helpers: write an interchange problem into the database, and dump the database.

`seed_problem` is the inverse of `load_snapshot`, so store tests can start from the shared
example documents; `dump` reads every table so a test can prove that nothing was written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m

# The start of a problem document: zone z1 > row1 > rack1, rack2 (add nodes, tenants, ...).
TWO_RACKS: dict[str, Any] = {
    "version": 1,
    "zones": [{"id": "z1"}],
    "rows": [{"id": "row1", "zone": "z1"}],
    "racks": [{"id": "rack1", "row": "row1"}, {"id": "rack2", "row": "row1"}],
}


def node_columns(state: str) -> dict[str, Any]:
    return {
        "ready": {"health": m.NodeHealth.UP, "cordoned": False},
        "cordoned": {"health": m.NodeHealth.UP, "cordoned": True},
        "down": {"health": m.NodeHealth.DOWN, "cordoned": False, "evicted_at": m.utcnow()},
    }[state]


async def seed_problem(session: AsyncSession, doc: dict[str, Any]) -> None:
    """Insert the topology, tenants, deployments and placements of a problem document.

    Placed shards are RUNNING, and so are deployments with placements; the others are PENDING.
    A deployment id may be its key `TENANT/NAME` (the snapshot's) or its name alone.
    """
    session.add_all(m.Zone(id=z["id"]) for z in doc.get("zones", ()))
    session.add_all(m.Row(id=r["id"], zone_id=r["zone"], power_budget_w=r.get("power_budget_w"))
                    for r in doc.get("rows", ()))
    session.add_all(m.Rack(id=r["id"], row_id=r["row"], power_budget_w=r.get("power_budget_w"))
                    for r in doc.get("racks", ()))
    session.add_all(
        m.Node(
            id=n["id"], rack_id=n["rack"], accelerators=n["accelerators"],
            accelerator_model=n.get("accelerator_model", ""), hbm_gib=n.get("hbm_gib"),
            cpu_milli=n.get("cpu_milli"), memory_mib=n.get("memory_mib"),
            idle_power_w=n.get("idle_power_w", 0.0), labels=n.get("labels", {}),
            **node_columns(n.get("state", "ready")),
        )
        for n in doc["nodes"]
    )
    session.add_all(
        m.Tenant(
            id=t["id"], isolation=m.Isolation(t.get("isolation", "shared")), excludes=t.get("excludes", []),
            zones=t.get("zones", []), reserved_accelerators=t.get("reserved_accelerators"),
            max_accelerators=t.get("max_accelerators"), max_power_w=t.get("max_power_w"),
        )
        for t in doc.get("tenants", ())
    )
    await session.flush()
    placed = {p["deployment"] for p in doc.get("placements", ())}
    by_name: dict[str, m.Deployment] = {}
    for d in doc["deployments"]:
        shard = d["shard"]
        spread = d.get("spread")
        dep = m.Deployment(
            name=d["id"].rpartition("/")[2], tenant_id=d["tenant"], replicas=d["replicas"], min_replicas=d.get("min_replicas", 1),
            shards_per_replica=d["shards_per_replica"], shard_accelerators=shard["accelerators"],
            shard_accelerator_milli=shard.get("accelerator_milli", 1000), shard_hbm_gib=shard.get("hbm_gib", 0.0),
            shard_cpu_milli=shard.get("cpu_milli", 0), shard_memory_mib=shard.get("memory_mib", 0),
            shard_power_w=shard.get("power_w", 0.0), shard_accelerator_models=shard.get("accelerator_models", []),
            locality=m.Domain(d.get("locality", "rack")),
            spread_domain=m.Domain(spread["domain"]) if spread else None,
            spread_max_per_domain=spread["max_per_domain"] if spread else None,
            priority=d.get("priority", 0), preemptible=d.get("preemptible", False),
            phase=m.DeploymentPhase.RUNNING if d["id"] in placed else m.DeploymentPhase.PENDING,
        )
        session.add(dep)
        by_name[d["id"]] = dep
        await session.flush()  # ids in document order: the snapshot lists deployments by arrival
    session.add_all(
        m.Placement(
            deployment_id=by_name[p["deployment"]].id, replica=p["replica"], shard=p["shard"], node_id=p["node"],
            accelerator_indices=list(p["accelerator_indices"]), accelerator_milli=p.get("accelerator_milli"),
            phase=m.ShardPhase.RUNNING,
        )
        for p in doc.get("placements", ())
    )
    await session.flush()


async def dump(session: AsyncSession) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    out = {}
    for table in m.Base.metadata.sorted_tables:
        rows = await session.execute(select(table).order_by(*table.primary_key.columns))
        out[table.name] = [tuple(r) for r in rows]
    return out
