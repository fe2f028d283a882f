"""Zones, rows and racks: the mesh's fixed shape."""

from __future__ import annotations

from sqlalchemy import select
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
