"""Stopping placed replicas outside a plan commit (rollouts retiring replicas, failed replicas
released to be placed again): the rows go, their usage meters stop, their nodes get a new
assignment set, the cluster generation moves, and each decision is an event and an audit entry."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import audit
from controller.store.metering import stop_intervals
from controller.domain.changes import ClusterChange
from controller.store.changes import bump_cluster_generation, will_move_generation
from controller.store.inlist import any_of_in_order
from controller.store.models import Event, Node, Placement

_CHUNK = 500


async def stop_placements(session: AsyncSession, ids: Sequence[int], nodes: Iterable[str], now: datetime,
                          deployments: Iterable[str] = ()) -> None:
    """Delete the placements `ids` (on `nodes`), in the caller's transaction; `deployments`: the
    keys (TENANT/NAME) of the deployments they belong to, logged with the change (a warm cache
    reads those deployments' shards again instead of the whole cluster; none: it reads it all)."""
    await will_move_generation(session)  # before its rows (PostgreSQL's lock order: store/changes.py)
    ordered = sorted(ids)  # each table's rows in ascending id (the lock order)
    for start in range(0, len(ordered), _CHUNK):
        await session.execute(delete(Placement)
                              .where(any_of_in_order(session, Placement.id, ordered[start:start + _CHUNK], deletes=True))
                              .execution_options(synchronize_session=False))
    await stop_intervals(session, list(ids), now)
    await session.execute(update(Node).where(any_of_in_order(session, Node.id, set(nodes), deletes=False))
                          .values(assignment_generation=Node.assignment_generation + 1)
                          .execution_options(synchronize_session=False))
    await bump_cluster_generation(session, ClusterChange.placements(deployments))


async def record_decisions(session: AsyncSession, events: Sequence[dict[str, Any]], now: datetime,
                           actor: str = "controller") -> None:
    """Each event ({kind, object_id, message, data, tenant}, about a deployment) and its audit entry."""
    for e in events:
        session.add(Event(at=now, actor=actor, kind=e["kind"], object_kind="deployment", object_id=e["object_id"],
                          message=e["message"], data=e["data"]))
    await audit.append(session, [audit.AuditRecord(
        actor=actor, role="controller", tenant=e["tenant"], action=e["kind"], object_kind="deployment",
        object_id=e["object_id"], detail={"message": e["message"], **e["data"]}) for e in events], at=now)
