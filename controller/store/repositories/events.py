"""The event log: recording events in a unit of work, and listing them after an id (`maiactl events`, the watch)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store import models as m
from controller.store.unnest import InsertRows
from controller.domain import values as d


def record_event(
    session: AsyncSession, *, actor: str, kind: str, object_kind: str, object_id: str,
    message: str = "", data: dict | None = None,
) -> None:
    session.add(m.Event(actor=actor, kind=kind, object_kind=object_kind, object_id=object_id,
                        message=message, data=data or {}))


@dataclass(frozen=True)
class NewEvent:
    """An event to record (`record_events`)."""

    actor: str
    kind: str
    object_kind: str
    object_id: str
    message: str = ""
    data: dict = field(default_factory=dict)
    at: datetime | None = None  # when it happened; None: when it is written


async def record_events(session: AsyncSession, events: Iterable[NewEvent]) -> None:
    """Several events in one INSERT statement (`record_event` adds an ORM row, which the flush
    writes with a statement of its own on SQLite, to learn its id)."""
    await event_rows(events).write(session)


def event_rows(events: Iterable[NewEvent]) -> InsertRows:
    """The events' rows, to INSERT by one statement (`record_events`), or by another that carries
    them (`audit.append(along=)`)."""
    at = m.utcnow()
    return InsertRows(m.Event.__table__, [
        {"at": e.at or at, "actor": e.actor, "kind": e.kind, "object_kind": e.object_kind, "object_id": e.object_id,
         "message": e.message, "data": e.data} for e in events])


async def events_of_kinds(session: AsyncSession, kinds: Collection[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every event of these kinds, oldest first: (kind, message, data). The kinds go into the
    statement as literals, not bound parameters: what either database needs to read them through a
    partial index of those kinds (`models.Event`: the isolation watchdog's, migration 0021)."""
    of_kinds = m.Event.kind.in_(bindparam("kinds", list(kinds), expanding=True, literal_execute=True))
    query = select(m.Event.kind, m.Event.message, m.Event.data).where(of_kinds).order_by(m.Event.id)
    return [(kind, message, data) for kind, message, data in await session.execute(query)]


async def newest_event_id(session: AsyncSession) -> int:
    """The highest id in the history (0: none), whatever the kind: where a reader's read reached."""
    return int(await session.scalar(select(func.max(m.Event.id))) or 0)


async def list_events(session: AsyncSession, *, object_kind: str = "", object_id: str = "", after_id: int = 0,
                      limit: int = 100, since: datetime | None = None,
                      oldest_first: bool = False) -> list[d.EventView]:
    """The newest `limit` events matching (at `since` or later), returned oldest first; after an
    id (`after_id` > 0, a follower's next ask) or `oldest_first`, the oldest `limit` after it: a
    follower that asks again from the last id it got misses none however many came between its
    asks (the newest `limit` after it skipped all but the last `limit`)."""
    query = select(m.Event).where(m.Event.id > after_id)
    if since is not None:
        query = query.where(m.Event.at >= since)
    if object_kind:
        query = query.where(m.Event.object_kind == object_kind)
    if object_id:
        query = query.where(m.Event.object_id == object_id)
    if after_id > 0 or oldest_first:
        rows = list(await session.scalars(query.order_by(m.Event.id).limit(limit)))
    else:
        rows = list(reversed(list(await session.scalars(query.order_by(m.Event.id.desc()).limit(limit)))))
    return [d.EventView(id=r.id, at=r.at, actor=r.actor, kind=r.kind, object_kind=r.object_kind,
                        object_id=r.object_id, message=r.message) for r in rows]
