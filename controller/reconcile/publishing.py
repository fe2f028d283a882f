"""Telling watchers what a reconcile pass committed, without holding up the pass.

Reading the views of the deployments a commit changed costs round trips (on PostgreSQL under load
a sixth of every pass), so the `Publisher` does it in the background, one publish after the other
in the order of the commits, retrying reads the database failed (an outage) until it answers. A
commit whose outcome is unknown is published as stored (`Publisher._as_stored`). The reconciler
owns one and hands it every commit's changes (`Publisher.publish_in_order`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from controller.aio import cancel_and_wait
from controller.store.db import Database, database_failed
from controller.usecases.deployments import views_of
from controller.domain.values import DeploymentView

from controller.reconcile.protocols import ViewReader

log = logging.getLogger("maia.reconcile")

# A publish whose read of the deployments failed for the database tries again after the reconcile
# interval (at least the first), doubling up to the second (`Publisher._read_stored`).
MIN_PUBLISH_RETRY_S = 0.05
MAX_PUBLISH_RETRY_S = 30.0


class Publisher:
    """The publishes of a reconciler's commits, in commit order (`publish_in_order`)."""

    def __init__(self, db: Database, publish: Callable[..., Awaitable[None]], *,
                 read_views: ViewReader | None, interval_s: float) -> None:
        self.db = db            # the reconciler's (its own thread's while `run` runs there)
        self.publish = publish  # handed to the controller's loop while `run` runs on its own
        # Given: the views of the deployments a commit changed are read here, on the reconciler's
        # own connection (and loop), and handed to `publish(changed, deleted, views)`; else `publish`
        # reads them (on the controller's loop).
        self._read_views = read_views
        self._interval = interval_s
        self._publishing: asyncio.Task[None] | None = None  # the last of the publishes in flight (in order)
        self._publishes: set[asyncio.Task[None]] = set()    # every one in flight (cancelled when `run` ends)
        self.published_after_ms = 0.0        # the last publish done: from its commit to the watchers told (the log line)

    @property
    def busy(self) -> bool:
        """A publish is in flight."""
        return self._publishing is not None and not self._publishing.done()

    async def cancel(self) -> None:
        """Cancel every publish in flight and wait for them (the reconciler's `run` ended)."""
        await cancel_and_wait(tuple(self._publishes))

    def publish_in_order(self, changed: set[str], deleted: list[DeploymentView], *, unsure: bool = False) -> None:
        """Publish what a commit changed without holding up the pass: reading the deployments'
        views for the watchers costs round trips that, on PostgreSQL under load, took a sixth of
        every pass. Publishes run one after the other, in the order of the commits. `unsure`: the
        commit's outcome is unknown (`PassState.commit`): watchers are told what is stored (`_as_stored`)."""
        self._publishing = asyncio.get_running_loop().create_task(
            self._publish_after(self._publishing, changed, deleted, time.perf_counter(), unsure=unsure))
        self._publishes.add(self._publishing)
        self._publishing.add_done_callback(self._publishes.discard)

    async def _publish_after(self, previous: asyncio.Task[None] | None, changed: set[str],
                             deleted: list[DeploymentView], queued: float, *, unsure: bool = False) -> None:
        if previous is not None:  # cancelled while it waits: `run` ended, and cancels every publish in flight
            await asyncio.wait([previous])
        try:
            views: list[DeploymentView] = []
            if unsure:
                changed, deleted, views = await self._as_stored(changed, deleted)
            elif self._read_views is not None and changed:
                views = await self._read_stored(changed, self._read_views)
            if (changed or deleted) and self._read_views is None:  # `publish` reads the views itself
                await self.publish(changed, deleted)
            elif changed or deleted:
                await self.publish(changed, deleted, views)
        except Exception:
            log.exception("publishing %d changed and %d deleted deployments failed", len(changed), len(deleted))
        self.published_after_ms = (time.perf_counter() - queued) * 1000

    async def _read_stored(self, keys: set[str], read: ViewReader) -> list[DeploymentView]:
        """`read(uow, keys)` once the database answers: a read that fails for the database
        (`database_failed`: a connection lost, none in time) is tried again, after the reconcile
        interval doubling up to `MAX_PUBLISH_RETRY_S`, until it answers; the publishes behind it
        wait (they stay in commit order). A commit that landed is so told to watchers after an
        outage rather than never."""
        wait = max(self._interval, MIN_PUBLISH_RETRY_S)
        while True:
            try:
                async with self.db.unit_of_work() as uow:
                    return await read(uow, keys)
            except Exception as exc:
                if not database_failed(exc):
                    raise
                log.warning("reading %d deployments to publish failed (%s: %s); trying again in %.1fs", len(keys),
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, MAX_PUBLISH_RETRY_S)

    async def _as_stored(self, changed: set[str], deleted: list[DeploymentView],
                         ) -> tuple[set[str], list[DeploymentView], list[DeploymentView]]:
        """What a commit whose outcome is unknown would have changed, as stored once the database
        answers (`_read_stored`): whether it landed or not, watchers are told only what is stored.
        The deployments it changed that exist, with their views as read (placed if it landed, as
        before if not: an event that repeats a state, never one that was not stored); of those it
        would have removed, the ones gone, with their last views (deleted). One it would have
        removed that is still there was DELETING and still is: nothing to say of it."""
        stored = await self._read_stored(changed | {view.spec.key for view in deleted}, self._read_views or views_of)
        keys = {view.spec.key for view in stored}
        return (changed & keys, [view for view in deleted if view.spec.key not in keys],
                [view for view in stored if view.spec.key in changed])

    async def published(self) -> None:
        """Wait until every publish started so far is done."""
        while self._publishing is not None and not self._publishing.done():
            await asyncio.wait([self._publishing])

