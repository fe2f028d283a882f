"""What the web console shows, read from the database in one unit of work, as plain JSON.

The rack map (zones > rows > racks > nodes > accelerators, each accelerator with the tenants
holding it and how many milli-units), power used vs budget per rack and row, deployments with
their phase and the solver's reasons, and the usage meter's totals per tenant. A principal
bound to a tenant sees its own deployments, usage and accelerators; other tenants' holdings
show as "other" (the map's shape stays, whose work it is does not).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import metering
from controller.store import models as m
from controller.store import repositories as repo
from controller.usecases.redaction import NOTHING, Redactor

OTHER_TENANT = "other"
# Distinguishable on a dark background; assigned to tenants in name order.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")


def tenant_colours(tenants: list[str]) -> dict[str, str]:
    return {tenant: PALETTE[i % len(PALETTE)] for i, tenant in enumerate(sorted(tenants))}


def _visible(tenant: str, viewer_tenant: str) -> str:
    return tenant if not viewer_tenant or tenant == viewer_tenant else OTHER_TENANT


async def console_state(session: AsyncSession, *, viewer_tenant: str = "", now: datetime | None = None) -> dict[str, Any]:
    """The whole console document; `viewer_tenant` non-empty: that tenant's view."""
    now = now or datetime.now(timezone.utc)
    placed = await repo.cluster_usage(session)

    # Accelerator -> tenant -> milli, from every placed shard.
    held: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows = await session.execute(
        select(m.Placement.node_id, m.Placement.accelerator_indices, m.Placement.accelerator_milli,
               m.Deployment.tenant_id, m.Deployment.shard_accelerators).join(m.Deployment))
    for node_id, indices, milli, tenant, shard_accelerators in rows:
        per_accelerator = metering.shard_milli(shard_accelerators, milli) // max(1, len(indices or ()))
        for index in indices or ():
            held[(node_id, index)][_visible(tenant, viewer_tenant)] += per_accelerator

    nodes_by_rack: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for node in await repo.list_node_rows(session):
        accelerators = [
            {"index": i, "holders": [{"tenant": t, "milli": milli} for t, milli in sorted(held[(node.id, i)].items())]}
            for i in range(node.accelerators)
        ]
        nodes_by_rack[node.rack_id].append({"id": node.id, "state": node.state, "model": node.accelerator_model,
                                            "accelerators": accelerators})
    racks_by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rack in await repo.list_racks(session):
        racks_by_row[rack.row_id].append({
            "id": rack.id, "power_used_w": placed.rack_power_w.get(rack.id, 0.0), "power_budget_w": rack.power_budget_w,
            "nodes": sorted(nodes_by_rack.get(rack.id, []), key=lambda n: n["id"]),
        })
    rows_by_zone: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in await repo.list_rows(session):
        rows_by_zone[row.zone_id].append({
            "id": row.id, "power_used_w": placed.row_power_w.get(row.id, 0.0), "power_budget_w": row.power_budget_w,
            "racks": sorted(racks_by_row.get(row.id, []), key=lambda r: r["id"]),
        })
    zones = [{"id": zone.id, "rows": sorted(rows_by_zone.get(zone.id, []), key=lambda r: r["id"])}
             for zone in sorted(await repo.list_zones(session), key=lambda z: z.id)]

    tenant_ids = [t.id for t in await repo.list_tenant_rows(session)]
    colours = tenant_colours(tenant_ids)
    shown = [t for t in sorted(tenant_ids) if not viewer_tenant or t == viewer_tenant]
    redactor = Redactor([t for t in tenant_ids if t != viewer_tenant]) if viewer_tenant else NOTHING
    deployments = [
        {"name": v.spec.name, "tenant": v.spec.tenant, "phase": v.phase, "replicas": v.spec.replicas,
         "placed_replicas": v.placed_replicas, "running_replicas": v.running_replicas,
         "reasons": [{"code": r.code, "message": r.message} for r in redactor.reasons(v.reasons)]}
        for v in (repo.deployment_view(row) for row in await repo.list_deployment_rows(session, tenant=viewer_tenant))
    ]
    usage = [
        {"tenant": t.tenant, "accelerator_hours": t.accelerator_hours, "energy_kwh": t.energy_kwh}
        for t in await metering.usage_by(session, ("tenant",), now=now, tenant=viewer_tenant)
    ]
    return {
        "generated_at": now.isoformat(),
        "viewer_tenant": viewer_tenant,
        "tenants": [{"id": t, "colour": colours[t]} for t in shown],
        "zones": zones,
        "deployments": deployments,
        "usage": usage,
    }
