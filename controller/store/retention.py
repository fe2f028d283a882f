"""Event retention: events past their time to live deleted a batch at a time
(`controller.retention.EventRetention`, the leader's, `maia-controller --event-ttl`).

`events` is the controller's busiest table (a few rows a deployment, more for each node's ups and
downs: ~100 a second at 50 deployments a second, 8.6 million a day) and its history is for people
(`maiactl get events`, `maiactl describe`, credits for an outage). Three kinds are read back as
state and are never deleted here: the isolation watchdog's alarms and clearings (a new leader
learns the alarms standing from them, `controller.watchdog`) and a node's drain (`node.draining`:
the count of replicas the drain is measured against, `controller.store.rollout`). They are rare:
an alarm, an operator's drain.

Nor is the newest event ever deleted, however old: SQLite gives a new row the highest id in the
table plus one, and with the newest gone a new event would take an id a reader following the
history (`ListEvents(after_id=)`, `maiactl get events -w`) has already passed.

Each batch raises the retention mark (`event_retention.deleted_through`, the highest id deleted)
in its own transaction: a reader asking for the events after a lower id is told they are gone
(OUT_OF_RANGE, `usecases.events`) instead of being answered as if none had been there.

One more reader tolerates the cut: `rollout._placed_again` looks for the moves and fills of an
older revision's replica since its deployment last rolled; one placed again longer than the time
to live ago and not running now counts as not placed again, and goes as any outgoing replica that
serves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.inlist import any_of
from controller.store.models import DRAIN_EVENT, ISOLATION_KINDS, Event, EventRetentionMark

# The isolation watchdog's kinds and the drain's.
STATE_KINDS = (*ISOLATION_KINDS, DRAIN_EVENT)
# Ids a DELETE lists at most: SQLite before 3.32 takes 999 bound parameters, and the store's other
# lists stop at 500 too.
IDS_A_STATEMENT = 500


@dataclass(frozen=True)
class Pruned:
    """What one `prune_events` deleted: how many, and the latest time among them (None: none)."""

    count: int
    reached: datetime | None


async def prune_events(session: AsyncSession, before: datetime, limit: int, *,
                       since: datetime | None = None) -> Pruned:
    """Delete the oldest `limit` events at most recorded before `before` (and at `since` or later:
    where the last batch stopped), those of the `STATE_KINDS` and the newest event excepted.

    Read through the index on `at` from `since` on: a batch costs the rows it deletes, not the
    table, nor the entries of rows earlier batches deleted (PostgreSQL keeps those in the index
    until a vacuum may drop them, and while an old snapshot is open, a dump's, a batch walking
    them from the start again grew with every batch)."""
    due = select(Event.id, Event.at).where(
        Event.at < before, Event.kind.not_in(STATE_KINDS),
        Event.id < select(func.max(Event.id)).scalar_subquery())
    if since is not None:
        due = due.where(Event.at >= since)
    rows = (await session.execute(due.order_by(Event.at).limit(limit))).all()
    if not rows:
        return Pruned(0, None)
    table, ids, count = Event.__table__, [row.id for row in rows], 0
    for start in range(0, len(ids), IDS_A_STATEMENT):
        listed = any_of(session, table.c.id, ids[start:start + IDS_A_STATEMENT])
        count += int((await session.execute(delete(table).where(listed))).rowcount or 0)
    top = max(ids)
    await session.execute(update(EventRetentionMark).where(
        EventRetentionMark.id == 1, EventRetentionMark.deleted_through < top).values(deleted_through=top))
    return Pruned(count, max(row.at for row in rows))


async def events_deleted_through(session: AsyncSession) -> int:
    """The highest event id retention deleted (0: none)."""
    through = await session.scalar(select(EventRetentionMark.deleted_through).where(EventRetentionMark.id == 1))
    return int(through or 0)
