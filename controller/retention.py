"""The leader deletes events older than `--event-ttl` (7 days by default; 0 keeps them all).

Without it `events` grows for ever: a few rows a deployment and a row for each node's change, so
~8.6 million a day at 50 deployments a second. Every `interval_s` the leader deletes what passed the
time to live (but the kinds read back as state, and the newest event: `controller.store.retention`),
`batch` rows a transaction, oldest first, each batch reading on from where the last one stopped
and followed by a pause nine times as long as it took: the deletion takes a tenth of the
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

from controller.aio import leader_passes
from controller.store.db import Database
from controller.store.lease import LeaseLost
from controller.store.models import utcnow
from controller.store.retention import prune_events

log = logging.getLogger("maia.retention")

PRUNE_EVERY_S = 60.0
BATCH_ROWS = 500  # a DELETE of one list (`store.retention.IDS_A_STATEMENT`), ~5 ms of the writer
# Of the time a run of batches takes, the share spent deleting: after a batch, a pause of
# (1 / share - 1) times what it took.
WRITER_SHARE = 0.1


class EventRetention:
    """Deletes the events past `ttl_s` every `interval_s`, while `should_run` (module docstring)."""

    def __init__(self, db: Database, *, ttl_s: float, should_run: Callable[[], bool],
                 interval_s: float = PRUNE_EVERY_S, batch: int = BATCH_ROWS,
                 on_pruned: Callable[[int], None] = lambda count: None,
                 now: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if ttl_s <= 0:
            raise ValueError(f"an event TTL must be > 0 (0 means no retention task), got {ttl_s}")
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
        """Delete every event recorded more than the TTL ago, a batch a transaction with a pause
        after each, until a batch finds fewer than a whole batch or this controller no longer
        leads; how many it deleted."""
        before = self._now() - timedelta(seconds=self.ttl_s)
        pruned = 0
        # The latest time a batch of this pass reached: the next reads on from there. A pass starts
        # from the oldest event again: one recorded late with an older time, or a deletion a
        # database failover lost, is not skipped for good.
        reached: datetime | None = None
        while self._should_run():
            started = time.perf_counter()
            async with self._db.unit_of_work() as uow:
                batch = await prune_events(uow.session, before, self._batch, since=reached)
                await uow.commit()
            reached = batch.reached or reached
            pruned += batch.count
            self.pruned_total += batch.count
            self._on_pruned(batch.count)
            if batch.count < self._batch:
                break
            await self._sleep((time.perf_counter() - started) * (1 / WRITER_SHARE - 1))
        if pruned:
            log.info("deleted %d events recorded before %s (--event-ttl %gs)", pruned, before.isoformat(), self.ttl_s)
        return pruned

    async def run(self) -> None:
        """`prune_once` every `interval_s` while leading, until cancelled; a failed one is logged
        and the next goes on time."""
        await leader_passes(self.interval_s, self._should_run, self.prune_once, what="event retention pass",
                            quiet=(LeaseLost,), logger=log)
