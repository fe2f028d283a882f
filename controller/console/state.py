"""What the web console shows, read from the database in one unit of work, as plain JSON.

The rack map (zones > rows > racks > nodes > accelerators, each accelerator with the tenants
holding it and how many milli-units), power used vs budget per rack and row, deployments with
their phase and the solver's reasons, and the usage meter's totals per tenant. A principal
bound to a tenant sees its own deployments, usage and accelerators; other tenants' holdings
show as `OTHER_TENANT` ("*", which no tenant id can be: "other" was one, and a tenant of that id
counted every other tenant's accelerators as its own) (the map's shape stays, whose work it is
does not).

The document covers every node, placement and deployment, so it is read as the tables' plain
columns (Core statements: no ORM entity, no ORM result processing) in `read_console_rows`, and
made from those rows by `console_document`, a pure function the caller runs in a worker thread.
Through the ORM (every deployment loaded with its placements and made a `DeploymentView`) one
document cost ~1.9 s of the event loop's CPU at 4,096 nodes and 10,000 deployments, in the
controller's own loop, at every refresh of every open console (docs/benchmarks.md,
`consolecost`).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Row, Text, cast, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.domain.values import ReasonView, split_deployment_key
from controller.store import metering
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.nominations import nominated_nodes
from controller.store.rollout import stored_key
from controller.usecases.redaction import NOTHING, Redactor

OTHER_TENANT = "*"  # other tenants, in a tenant's view: no id (ids begin with a letter or digit)
# Distinguishable on a dark background; assigned to tenants in name order.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")

_NODES, _RACKS = m.Node.__table__.c, m.Rack.__table__.c
_PLACEMENTS, _DEPLOYMENTS = m.Placement.__table__.c, m.Deployment.__table__.c

# Accelerator holdings: each placed shard's node, accelerator indices (JSON as text: decoded once
# per distinct list, in the worker thread), milli-units and tenant.
_HOLDINGS = (select(_PLACEMENTS.node_id, cast(_PLACEMENTS.accelerator_indices, Text), _PLACEMENTS.accelerator_milli,
                    _DEPLOYMENTS.tenant_id)
             .select_from(m.Placement.__table__.join(m.Deployment.__table__,
                                                     _PLACEMENTS.deployment_id == _DEPLOYMENTS.id)))
_NODE_MAP = select(_NODES.id, _NODES.rack_id, _NODES.health, _NODES.cordoned, _NODES.accelerator_model,
                   _NODES.accelerators, _NODES.failed_accelerators).order_by(_NODES.id)
_RACK_LIST = select(_RACKS.id, _RACKS.row_id, _RACKS.power_budget_w).order_by(_RACKS.id)


def tenant_colours(tenants: list[str]) -> dict[str, str]:
    """An operator's view: the tenants in id order through the palette (distinct up to its size)."""
    return {tenant: PALETTE[i % len(PALETTE)] for i, tenant in enumerate(sorted(tenants))}


def own_colour(tenant: str) -> str:
    """A tenant's view of its own colour: from its id alone. From its place among every tenant's
    ids (`tenant_colours`), it told the tenant how many ids sort before its own, and changed as
    tenants came and went."""
    return PALETTE[zlib.crc32(tenant.encode()) % len(PALETTE)]


def _visible(tenant: str, viewer_tenant: str) -> str:
    return tenant if not viewer_tenant or tenant == viewer_tenant else OTHER_TENANT


@dataclass(frozen=True)
class ConsoleRows:
    """What one console document is made of, as read (`read_console_rows`)."""

    viewer_tenant: str
    now: datetime
    power: repo.ClusterUsage  # placed power per rack and row (`repo.power_usage`)
    holdings: Sequence[Row[Any]]
    nodes: Sequence[Row[Any]]
    racks: Sequence[Row[Any]]
    datacenter_rows: list[tuple[str, str, float | None]]  # (row, zone, power budget)
    zones: list[str]
    tenants: list[str]
    known_tenants: list[str]  # every tenant id ever (deleted ones too): what a tenant's view redacts
    deployments: repo.SummaryRows
    usage: list[metering.UsageTotal]  # to date: the closed sums and the open accrual, not the history
    # Node -> the deployment (key) a head-of-line nomination keeps it for (store/nominations.py).
    nominated: dict[str, str] = field(default_factory=dict)


async def read_console_rows(session: AsyncSession, *, viewer_tenant: str = "",
                            now: datetime | None = None) -> ConsoleRows:
    """Every row one document needs, in one unit of work (`viewer_tenant` non-empty: that
    tenant's deployments and usage only)."""
    now = now or datetime.now(timezone.utc)
    return ConsoleRows(
        viewer_tenant=viewer_tenant, now=now, power=await repo.power_usage(session),
        holdings=(await session.execute(_HOLDINGS)).all(),
        nodes=(await session.execute(_NODE_MAP)).all(),
        racks=(await session.execute(_RACK_LIST)).all(),
        datacenter_rows=[(row.id, row.zone_id, row.power_budget_w) for row in await repo.list_rows(session)],
        zones=[zone.id for zone in await repo.list_zones(session)],
        tenants=[t.id for t in await repo.list_tenant_rows(session)],
        known_tenants=await repo.known_tenant_ids(session) if viewer_tenant else [],
        deployments=await repo.deployment_summary_rows(session, tenant=viewer_tenant),
        # A tenant's viewer sees its own customer's usage, not that of its id's customer before.
        usage=await _customer_usage(session, viewer_tenant, now) if viewer_tenant
        else await metering.usage_to_date(session, ("tenant",), now=now),
        nominated={node: stored_key(nom.solver_id) for node, nom in (await nominated_nodes(session)).items()},
    )


async def _customer_usage(session: AsyncSession, tenant: str, now: datetime) -> list[metering.UsageTotal]:
    customer = await repo.customer_of(session, tenant)
    return await metering.customer_usage_to_date(session, tenant, now=now,
                                                 born=customer.created_at if customer else None,
                                                 before=customer.usage_before if customer else None)


def _accelerator(index: int, held: Mapping[str, int] | None, failed: Mapping[int, str]) -> dict[str, Any]:
    """One accelerator of the map: who holds how much of it, and why it failed (if it did)."""
    doc: dict[str, Any] = {"index": index, "holders": _holders(held)}
    if index in failed:
        doc["failed"] = failed[index] or "failed"
    return doc


def console_document(read: ConsoleRows) -> dict[str, Any]:
    """The console document of `read`'s rows: pure, CPU only (the caller's worker thread)."""
    viewer_tenant = read.viewer_tenant
    # Accelerator -> tenant -> milli, from every placed shard.
    held: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    decoded: dict[str | None, list[int]] = {None: []}
    for node_id, indices_text, milli, tenant in read.holdings:
        indices = decoded.get(indices_text)
        if indices is None:
            indices = decoded[indices_text] = json.loads(indices_text) or []
        # By its own indices, not its deployment's current shard (an older revision's, in a rollout).
        per_accelerator = metering.shard_milli(len(indices), milli) // max(1, len(indices))
        for index in indices:
            held[(node_id, index)][_visible(tenant, viewer_tenant)] += per_accelerator

    nodes_by_rack: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for node_id, rack_id, health, cordoned, model, accelerators, failed_column in read.nodes:
        failed = {f.index: f.reason for f in repo.stored_faults(failed_column)}
        node = {
            "id": node_id, "state": m.operator_state(health, cordoned), "model": model,
            "accelerators": [_accelerator(i, held.get((node_id, i)), failed) for i in range(accelerators)],
        }
        if node_id in read.nominated:  # kept at the head of the line; another tenant's only as OTHER_TENANT
            key = read.nominated[node_id]
            tenant = split_deployment_key(key)[0]
            node["nominated_for"] = key if _visible(tenant, viewer_tenant) == tenant else OTHER_TENANT
        nodes_by_rack[rack_id].append(node)
    racks_by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rack_id, row_id, budget in read.racks:
        racks_by_row[row_id].append({
            "id": rack_id, "power_used_w": read.power.rack_power_w.get(rack_id, 0.0), "power_budget_w": budget,
            "nodes": sorted(nodes_by_rack.get(rack_id, []), key=lambda n: n["id"]),
        })
    rows_by_zone: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row_id, zone_id, budget in read.datacenter_rows:
        rows_by_zone[zone_id].append({
            "id": row_id, "power_used_w": read.power.row_power_w.get(row_id, 0.0), "power_budget_w": budget,
            "racks": sorted(racks_by_row.get(row_id, []), key=lambda r: r["id"]),
        })
    zones = [{"id": zone, "rows": sorted(rows_by_zone.get(zone, []), key=lambda r: r["id"])}
             for zone in sorted(read.zones)]

    shown = [t for t in sorted(read.tenants) if not viewer_tenant or t == viewer_tenant]
    colours = tenant_colours(read.tenants) if not viewer_tenant else {t: own_colour(t) for t in shown}
    # Stored reasons outlive the tenants they name: a deleted tenant's id is redacted too.
    redactor = Redactor([t for t in read.known_tenants if t != viewer_tenant],
                        viewer=viewer_tenant) if viewer_tenant else NOTHING
    deployments = [
        {"name": s.name, "tenant": s.tenant, "phase": s.phase, "replicas": s.replicas,
         "placed_replicas": s.placed_replicas, "running_replicas": s.running_replicas,
         "reasons": [{"code": r.code, "message": r.message} for r in redactor.reasons(_reasons(s.reasons))]
         if s.reasons else []}
        for s in read.deployments.summaries()
    ]
    usage = [{"tenant": t.tenant, "accelerator_hours": t.accelerator_hours, "energy_kwh": t.energy_kwh}
             for t in read.usage]
    return {
        "generated_at": read.now.isoformat(),
        "viewer_tenant": viewer_tenant,
        "tenants": [{"id": t, "colour": colours[t]} for t in shown],
        "zones": zones,
        "deployments": deployments,
        "usage": usage,
    }


def _holders(held: Mapping[str, int] | None) -> list[dict[str, Any]]:
    return [{"tenant": t, "milli": milli} for t, milli in sorted(held.items())] if held else []


def _reasons(stored: Sequence[dict[str, Any]] | None) -> list[ReasonView]:
    return [ReasonView(r.get("code", ""), r.get("message", ""), r.get("scope") or "") for r in stored or ()]


async def console_state(session: AsyncSession, *, viewer_tenant: str = "", now: datetime | None = None) -> dict[str, Any]:
    """The whole console document; `viewer_tenant` non-empty: that tenant's view. Read on the
    event loop, made in a worker thread."""
    read = await read_console_rows(session, viewer_tenant=viewer_tenant, now=now)
    return await asyncio.to_thread(console_document, read)
