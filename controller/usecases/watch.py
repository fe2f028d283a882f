"""Watching deployments: an in-process publish/subscribe fed by commits.

Good enough for one controller: every use case or reconcile step that commits a deployment
change publishes a `DeploymentEvent`; each watcher has a bounded queue. A watcher that falls
too far behind is cut off with UNAVAILABLE rather than slowing down the publishers (it can
simply watch again: the stream starts with the current state).

A watch is one call, its token checked as it opens: it is held by that token
(`controller.tokenstreams`) and ends UNAUTHENTICATED, sending nothing more, when the token is
revoked or expires, as a new call with it would be refused.

The current state is read and streamed a page at a time (`CURRENT_PAGE` deployments): read
whole, 10,000 deployments held the controller's event loop for over a second of CPU (every
RPC and agent stream waited), and no event left before the last row was read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager
from functools import partial

from controller.errors import Unavailable
from controller.identity import Principal
from controller.store.db import UnitOfWork
from controller.tokenstreams import StreamHold, TokenStreams
from controller.usecases import policy
from controller.usecases.deployments import list_deployments
from controller.usecases.paging import PageRequest
from controller.usecases.validation import check_name
from controller.domain.values import DeploymentEvent, DeploymentSpec, DeploymentView, ShardSpec
from controller.usecases.redaction import redactor_of

_CLOSED = object()
# Events a watcher may be behind by. One plan commit publishes an event per deployment it changed,
# all at once (thousands on a large cluster), before any watcher runs: a bound below that cut off
# every watcher on such a commit (bench e2e's watch at 1,024 nodes on PostgreSQL). A queued event
# is a reference to a view the bus shares among watchers, so the bound costs little memory.
WATCH_QUEUE_EVENTS = 20_000
# Deployments of a new watch's current state read at a time (each page in a transaction of its
# own, streamed before the next is read): ~15 ms of the event loop's time per page.
CURRENT_PAGE = 100
# Events in one message of WatchDeploymentBatches at most (a page of the current state is one).
WATCH_BATCH = CURRENT_PAGE
# A message is also bounded by what converting it costs, which grows with the placements its
# views carry: an event weighs `EVENT_WEIGHT` (its fixed part, ~8 placements' worth) plus one a
# placement. The handler converts and sends a message in one step of the event loop, every
# submit waiting: lists of 20-40 events, gangs' among them, held it 2-4 ms (bench e2e at 50/s,
# 4,096 nodes), and 100 events of a 64-shard gang (each of its shards' reports publishes one)
# would hold it ~10 ms. The bound is ~0.5 ms of conversion on a quiet host: 50 single-shard
# events, 6 of a 64-shard gang; an event heavier than the bound goes alone.
EVENT_WEIGHT = 8
# Deployments whose creation time the bus keeps at most (`DeploymentEventBus._of_a_replaced_row`).
CREATED_KEPT_MAX = 1_000_000
WATCH_BATCH_WEIGHT = 450


def _aware(at: datetime) -> datetime:
    """A stored time in UTC (SQLite hands back naive ones)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)


class DeploymentEventBus:
    def __init__(self, queue_size: int = WATCH_QUEUE_EVENTS) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue] = set()
        # The creation time of each stored deployment it told of (by key; a deleted one's dropped).
        self._created: dict[str, datetime] = {}

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def publish(self, event: DeploymentEvent) -> None:
        if self._of_a_replaced_row(event):
            return
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)
                self._close(queue)

    def _of_a_replaced_row(self, event: DeploymentEvent) -> bool:
        """Whether `event` speaks of a deployment an older row of its key was, one submitted again
        since being told of (created later): a reconcile pass's publish of a deletion runs in commit
        order, behind one that may wait for the database, while the name is free at the commit,
        and watchers were told a deployment submitted again meanwhile was deleted, after its
        `added` (found in review). Followers check the same of another controller's deletions
        (`PeerMessages`)."""
        view = event.deployment
        if view.created_at is None:  # another controller's deletion (`deleted_elsewhere`): checked there
            if event.type == "deleted":
                self._created.pop(view.spec.key, None)
            return False
        key, at = view.spec.key, _aware(view.created_at)
        newest = self._created.get(key)
        if newest is not None and at < newest:
            return True
        if event.type == "deleted":
            self._created.pop(key, None)
        else:
            if len(self._created) >= CREATED_KEPT_MAX and key not in self._created:
                self._created.clear()  # far more than a cluster holds: what they were for is long told
            self._created[key] = at
        return False

    def end(self, queue: asyncio.Queue) -> None:
        """End one watcher now (its token was revoked or expired: `controller.tokenstreams`): the
        events waiting for it are dropped, none is put for it again, and it wakes to the end marker."""
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_CLOSED)

    def close(self) -> None:
        """End every watch (shutdown, or a resync: each client watches again, from the current state)."""
        for queue in list(self._subscribers):
            self._close(queue)
        self._subscribers.clear()

    @staticmethod
    def _close(queue: asyncio.Queue) -> None:
        while True:  # make room for the end marker
            try:
                queue.put_nowait(_CLOSED)
                return
            except asyncio.QueueFull:
                queue.get_nowait()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)


def deleted_elsewhere(name: str, tenant: str) -> DeploymentEvent:
    """The `deleted` event for a deployment another controller deleted: its row is gone, so only
    its name and tenant are known (the watchers saw the rest as it went DELETING)."""
    spec = DeploymentSpec(name=name, tenant=tenant, replicas=0, shards_per_replica=0, shard=ShardSpec(accelerators=0))
    return DeploymentEvent("deleted", DeploymentView(spec=spec, phase="deleting"))


def _matches(event: DeploymentEvent, tenant: str, name: str) -> bool:
    spec = event.deployment.spec
    return (not tenant or spec.tenant == tenant) and (not name or spec.name == name)


async def watch_deployments(
    unit_of_work: Callable[[], AbstractAsyncContextManager[UnitOfWork]], who: Principal,
    bus: DeploymentEventBus, *, tenant: str = "", name: str = "", streams: TokenStreams | None = None,
) -> AsyncIterator[DeploymentEvent]:
    """The current state of matching deployments (ADDED), then every change to them; a tenant
    token watches its own tenant's deployments only. Ends UNAUTHENTICATED, sending nothing more,
    when the token it was opened with is revoked (told to `streams`: `TokenStreams.revoke`; None:
    no revocation ends it) or expires (a timer, whatever `streams`)."""
    tenant = _watched(who, tenant, name)
    with _subscribed(bus, streams, who) as (queue, held):
        async with aclosing(_batches(unit_of_work, who, queue, held, tenant, name)) as batches:
            async for batch in batches:
                for event in batch:
                    held.check()  # the token may end while the event before is sent
                    yield event


async def watch_deployment_batches(
    unit_of_work: Callable[[], AbstractAsyncContextManager[UnitOfWork]], who: Principal,
    bus: DeploymentEventBus, *, tenant: str = "", name: str = "", streams: TokenStreams | None = None,
) -> AsyncIterator[list[DeploymentEvent]]:
    """`watch_deployments`' events, in order, in lists of one to `WATCH_BATCH` events weighing
    `WATCH_BATCH_WEIGHT` at most (a heavier event alone): a page of the current state, then the
    changes waiting when the last list was taken, each cut where the weight runs out. Ends as
    `watch_deployments` does when its token is revoked or expires."""
    tenant = _watched(who, tenant, name)
    with _subscribed(bus, streams, who) as (queue, held):
        async with aclosing(_batches(unit_of_work, who, queue, held, tenant, name)) as batches:
            async for batch in batches:
                yield batch


def _watched(who: Principal, tenant: str, name: str) -> str:
    """The tenant whose deployments `who` watches (checked by the policy); a name is checked too."""
    tenant = policy.visible_tenant(who, tenant, "watching deployments")
    if name:
        check_name("deployment", name)
    return tenant


@contextmanager
def _subscribed(bus: DeploymentEventBus, streams: TokenStreams | None,
                who: Principal) -> Iterator[tuple[asyncio.Queue, StreamHold]]:
    """A queue on the bus, subscribed before the current state is read (so no change between the
    read and the stream is lost), and the watch held by its token: when the token is revoked or
    expires, the events waiting in the queue are dropped and the watch wakes to end (`bus.end`)."""
    queue = bus.subscribe()
    try:
        with (TokenStreams() if streams is None else streams).hold(who, partial(bus.end, queue)) as held:
            yield queue, held
    finally:
        bus.unsubscribe(queue)


async def _batches(unit_of_work: Callable[[], AbstractAsyncContextManager[UnitOfWork]], who: Principal,
                   queue: asyncio.Queue, held: StreamHold, tenant: str, name: str,
                   ) -> AsyncIterator[list[DeploymentEvent]]:
    """The watch's lists of events (`watch_deployment_batches`), `held.check`ed before each: one
    read or wait may have outlived the token (nothing is sent after it ended)."""
    async with aclosing(_current(unit_of_work, who, tenant, name)) as pages:
        async for views in pages:
            for batch in _by_weight([_added(view) for view in views]):
                held.check()
                yield batch
    while True:
        items = [await queue.get()]
        while len(items) < WATCH_BATCH and not queue.empty():
            items.append(queue.get_nowait())
        closed = any(e is _CLOSED for e in items)
        visible = await _visible(unit_of_work, who, [e for e in items if e is not _CLOSED
                                                     and _matches(e, tenant, name)])
        for batch in _by_weight(visible):
            held.check()
            yield batch
        if closed:
            held.check()  # ended for its token (`bus.end`), not for falling behind
            raise Unavailable("the watch fell behind or the controller is stopping; watch again")


def event_weight(event: DeploymentEvent) -> int:
    """What converting `event` for a watcher costs, in placements (see `EVENT_WEIGHT`)."""
    return EVENT_WEIGHT + len(event.deployment.placements)


def _by_weight(events: list[DeploymentEvent]) -> Iterator[list[DeploymentEvent]]:
    """`events` in order, in consecutive lists weighing `WATCH_BATCH_WEIGHT` at most (an event
    heavier than that alone); none for no events."""
    batch: list[DeploymentEvent] = []
    weight = 0
    for event in events:
        heft = event_weight(event)
        if batch and weight + heft > WATCH_BATCH_WEIGHT:
            yield batch
            batch, weight = [], 0
        batch.append(event)
        weight += heft
    if batch:
        yield batch


def _added(view: DeploymentView) -> DeploymentEvent:
    return DeploymentEvent("added", view)


async def _visible(unit_of_work: Callable[[], AbstractAsyncContextManager[UnitOfWork]], who: Principal,
                   events: list[DeploymentEvent]) -> list[DeploymentEvent]:
    """`events` as `who` may read them: the bus carries the admin's view, which quotes the
    solver's reasons (one read for the redactor, when a list has any)."""
    if who.is_admin or not any(e.deployment.reasons for e in events):
        return events
    async with unit_of_work() as uow:
        redactor = await redactor_of(uow, who)
    return [redactor.deployment_event(e) if e.deployment.reasons else e for e in events]


async def _current(unit_of_work: Callable[[], AbstractAsyncContextManager[UnitOfWork]], who: Principal,
                   tenant: str, name: str) -> AsyncIterator[tuple[DeploymentView, ...]]:
    """Every deployment `who` may see (of `tenant`; named `name`, if given: filtered in the query,
    so watching one deployment reads that one, not every deployment), by name, a page of
    `CURRENT_PAGE` at a time: each read in a unit of work of its own, closed before the page is
    handed out."""
    page = PageRequest(CURRENT_PAGE)
    while True:
        async with unit_of_work() as uow:
            got = await list_deployments(uow, who, tenant, page, name=name)
        yield got.items
        if not got.next_token:
            return
        page = PageRequest(CURRENT_PAGE, got.next_token)
