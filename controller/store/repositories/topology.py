"""Zones, rows and racks: the mesh's fixed shape."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from controller.store import models as m


async def list_zones(session: AsyncSession) -> list[m.Zone]:
    return list(await session.scalars(select(m.Zone).order_by(m.Zone.id)))


async def list_rows(session: AsyncSession) -> list[m.Row]:
    return list(await session.scalars(select(m.Row).order_by(m.Row.id)))


async def list_racks(session: AsyncSession) -> list[m.Rack]:
    return list(await session.scalars(select(m.Rack).options(selectinload(m.Rack.row)).order_by(m.Rack.id)))


async def get_rack(session: AsyncSession, rack_id: str) -> m.Rack | None:
    return await session.get(m.Rack, rack_id)


# What holds each kind of item: the child table and its column that names it.
_HELD_BY = {"rack": (m.Node, m.Node.rack_id), "row": (m.Rack, m.Rack.row_id), "zone": (m.Row, m.Row.zone_id)}
_MODELS: dict[str, type[m.Base]] = {"rack": m.Rack, "row": m.Row, "zone": m.Zone}


async def held_by(session: AsyncSession, kind: str, item_id: str, limit: int) -> tuple[int, list[str]]:
    """How many nodes a rack holds (racks a row, rows a zone), and the first `limit` of their ids."""
    model, column = _HELD_BY[kind]
    count = int(await session.scalar(select(func.count()).select_from(model).where(column == item_id)) or 0)
    ids = list(await session.scalars(select(model.id).where(column == item_id).order_by(model.id).limit(limit)))
    return count, ids


async def tenants_naming_zone(session: AsyncSession, zone_id: str) -> list[str]:
    """The tenants whose contract names the zone (their `zones`, a JSON list: read and judged here)."""
    return sorted(tenant_id for tenant_id, zones in await session.execute(select(m.Tenant.id, m.Tenant.zones))
                  if zone_id in (zones or ()))


async def lock_topology_item(session: AsyncSession, kind: str, item_id: str) -> bool:
    """Lock the rack, row or zone `item_id` for its deletion (PostgreSQL: a node registering into
    the rack, a rack into the row, a row into the zone holds its key share until it commits, and
    one that comes after waits for the deletion); False if there is none."""
    model = _MODELS[kind]
    return await session.scalar(select(model.id).where(model.id == item_id).with_for_update()) is not None


async def delete_topology_item(session: AsyncSession, kind: str, item_id: str) -> None:
    model = _MODELS[kind]
    await session.execute(delete(model).where(model.id == item_id))
