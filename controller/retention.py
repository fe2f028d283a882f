"""The leader deletes what passed its time to live: events after `--event-ttl` (7 days by
default; 0 keeps them all) and audit entries after `--audit-ttl` (0 by default: the audit log is
kept whole unless an operator sets one).

Without it each table grows for ever: `events` a few rows a deployment and a row for each node's
change (~8.6 million a day at 50 deployments a second), `audit_log` an entry a mutating call (~4.3
million a day at that rate). Every `interval_s` the leader deletes what passed the time to live
(events but the kinds read back as state and the newest, `controller.store.retention`; audit
entries as a prefix of the chain that verifies, its base moved along, `controller.store.audit.
prune`), `batch` rows a transaction, oldest first, each batch reading on from where the last one
stopped and followed by a pause nine times as long as it took: the deletion takes a tenth of the
database's writer at most (SQLite's one writer; PostgreSQL's rows and its write-ahead log), never
a long transaction, and on a table years behind it catches up at ~12,000 rows a second
(docs/benchmarks.md, `retention`). A follower deletes nothing; a leader that loses its lease stops
between two batches (each commit is fenced like every leader's write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from controller.aio import leader_passes
from controller.store import audit
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.models import utcnow
from controller.store.retention import Pruned, prune_events

log = logging.getLogger("maia.retention")

PRUNE_EVERY_S = 60.0
BATCH_ROWS = 500  # a DELETE of one list (`store.retention.IDS_A_STATEMENT`), ~5 ms of the writer
# Of the time a run of batches takes, the share spent deleting: after a batch, a pause of
# (1 / share - 1) times what it took.
WRITER_SHARE = 0.1


class Retention:
    """Deletes the rows of one table past `ttl_s` every `interval_s`, while `should_run` (module
    docstring); a subclass names the table (`what`, its flag) and how a batch goes (`_prune`)."""

    what = ""
    flag = ""

    def __init__(self, db: Database, *, ttl_s: float, should_run: Callable[[], bool],
                 interval_s: float = PRUNE_EVERY_S, batch: int = BATCH_ROWS,
                 on_pruned: Callable[[int], None] = lambda count: None,
                 now: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if ttl_s <= 0:
            raise ValueError(f"a TTL for {self.what} must be > 0 (0 means no retention task), got {ttl_s}")
        self._db = db
        self.ttl_s = ttl_s
        self._should_run = should_run
        self.interval_s = interval_s
        self._batch = batch
        self._on_pruned = on_pruned
        self._now = now
        self._sleep = sleep
        self.pruned_total = 0

    async def prune_once(self) -> int:
        """Delete every row recorded more than the TTL ago, a batch a transaction with a pause
        after each, until a batch finds fewer than a whole batch or this controller no longer
        leads; how many it deleted."""
        before = self._now() - timedelta(seconds=self.ttl_s)
        pruned = 0
        # The latest time a batch of this pass reached: the next reads on from there. A pass starts
        # from the oldest row again: one recorded late with an older time, or a deletion a
        # database failover lost, is not skipped for good.
        reached: datetime | None = None
        while self._should_run():
            started = time.perf_counter()
            async with self._db.unit_of_work() as uow:
                batch = await self._prune(uow.session, before, self._batch, since=reached)
                await uow.commit()
            reached = batch.reached or reached
            pruned += batch.count
            self.pruned_total += batch.count
            self._on_pruned(batch.count)
            if batch.count < self._batch:
                break
            await self._sleep((time.perf_counter() - started) * (1 / WRITER_SHARE - 1))
        if pruned:
            log.info("deleted %d %s recorded before %s (%s %gs)", pruned, self.what, before.isoformat(), self.flag,
                     self.ttl_s)
        return pruned

    async def run(self) -> None:
        """`prune_once` every `interval_s` while leading, until cancelled; a failed one is logged
        and the next goes on time."""
        await leader_passes(self.interval_s, self._should_run, self.prune_once, what=f"{self.what} retention pass",
                            quiet=(LeaseLost,), logger=log)

    async def _prune(self, session: AsyncSession, before: datetime, limit: int, *,
                     since: datetime | None) -> Pruned:
        raise NotImplementedError


class EventRetention(Retention):
    """Events past `--event-ttl` (`controller.store.retention.prune_events`)."""

    what = "events"
    flag = "--event-ttl"

    async def _prune(self, session: AsyncSession, before: datetime, limit: int, *,
                     since: datetime | None) -> Pruned:
        return await prune_events(session, before, limit, since=since)


class AuditRetention(Retention):
    """Audit entries past `--audit-ttl`, a prefix of the chain (`controller.store.audit.prune`)."""

    what = "audit entries"
    flag = "--audit-ttl"

    async def _prune(self, session: AsyncSession, before: datetime, limit: int, *,
                     since: datetime | None) -> Pruned:
        return await audit.prune(session, before, limit, since=since)
