"""The cluster and capacity generations as stored (`store/changes.py` moves them)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m


async def read_cluster_generation(session: AsyncSession) -> int:
    value = await session.scalar(select(m.ClusterState.generation).where(m.ClusterState.id == 1))
    return int(value or 0)


async def read_capacity_generation(session: AsyncSession) -> int:
    """Moves (by trigger) when a node is added, removed or changes capacity, rack, row or zone."""
    value = await session.scalar(select(m.CapacityState.generation).where(m.CapacityState.id == 1))
    return int(value or 0)
