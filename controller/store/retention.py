"""Event retention: events past their time to live deleted a batch at a time
(`controller.retention.EventRetention`, the leader's, `maia-controller --event-ttl`).

`events` is the controller's busiest table (a few rows a deployment, more for each node's ups and
downs: ~100 a second at 50 deployments a second, 8.6 million a day) and its history is for people
(`maiactl get events`, the console, credits for an outage). Three kinds are read back as state
and are never deleted here: the isolation watchdog's alarms and clearings (a new leader learns the
alarms standing from them, `controller.watchdog`) and a node's drain (`node.draining`: the count
of replicas the drain is measured against, `controller.store.rollout`). They are rare: an alarm,
an operator's drain.

One more reader tolerates the cut: `rollout._placed_again` looks for the moves and fills of a
replica since its deployment last rolled; a replica moved longer than the time to live ago and
still not running counts as not moved, and goes as any outgoing replica that does not run.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.store.models import Event
from controller.store.rollout import DRAIN_EVENT

# The isolation watchdog's kinds (`controller.watchdog.EVENT_KIND`, `CLEARED_KIND`; the partial
# index `models.ISOLATION_RECORDS` names them too) and the drain's.
STATE_KINDS = ("isolation.violation", "isolation.cleared", DRAIN_EVENT)


async def prune_events(session: AsyncSession, before: datetime, limit: int) -> int:
    """Delete the oldest `limit` events at most that were recorded before `before`, those of the
    `STATE_KINDS` excepted; how many it deleted. Read through the index on `at`: the statement
    costs the rows it deletes, not the table."""
    doomed = (select(Event.id).where(Event.at < before, Event.kind.not_in(STATE_KINDS))
              .order_by(Event.at).limit(limit).scalar_subquery())
    result = await session.execute(delete(Event).where(Event.id.in_(doomed)))
    return int(result.rowcount or 0)
