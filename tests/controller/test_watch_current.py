"""WatchDeployments' current state: read and streamed a page at a time, then the changes.

Read whole, 10,000 deployments held the controller's event loop for over a second and no event
left before the last row was read (bench e2e at 4,096 nodes: the submits' events waited behind
that list).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from controller.domain.values import DeploymentEvent, ShardPlacementView
from controller.errors import Unavailable
from controller.identity import Principal, Role
from controller.store import repositories as repo
from controller.store.db import Database, UnitOfWork
from controller.usecases import deployments, watch
from controller.usecases.ports import RecordingSignals
from controller.usecases.watch import DeploymentEventBus, watch_deployment_batches, watch_deployments
from uc_builders import WHO, add_tenant, deployment

NAMES = [f"d{i}" for i in range(5)]


class CountingUnitsOfWork:
    """`db.unit_of_work`, counting the units opened and those still open."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.opened = 0
        self.open = 0

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[UnitOfWork]:
        self.opened += 1
        self.open += 1
        try:
            async with self._db.unit_of_work() as uow:
                yield uow
        finally:
            self.open -= 1


async def _submit(db: Database, name: str, tenant: str = "t1") -> DeploymentEvent:
    signals = RecordingSignals()
    async with db.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment(name, tenant, accelerators=1), signals)
    [event] = signals.events
    return event


async def test_the_current_state_streams_a_page_at_a_time_then_every_change(cluster, monkeypatch):
    monkeypatch.setattr(watch, "CURRENT_PAGE", 2)
    for name in NAMES:
        await _submit(cluster, name)
    units, bus = CountingUnitsOfWork(cluster), DeploymentEventBus()
    events = watch_deployments(units, WHO, bus)
    try:
        first = await anext(events)
        # the first page is handed out before the second is read, its unit of work closed
        assert (first.type, first.deployment.spec.name) == ("added", "d0")
        assert (units.opened, units.open) == (1, 0)
        # a change committed while the current state streams comes after it, not lost
        bus.publish(await _submit(cluster, "late"))
        rest = [await anext(events) for _ in range(len(NAMES) - 1)]
        assert [(e.type, e.deployment.spec.name) for e in rest] == [("added", n) for n in NAMES[1:]]
        assert units.opened == 3  # 5 deployments + "late", 2 a page: the third page ends the list
        listed_late = await anext(events)  # "late" sorts after d4: listed by the last page ...
        assert (listed_late.type, listed_late.deployment.spec.name) == ("added", "late")
        published = await anext(events)  # ... and its event, published after the watch began, follows
        assert (published.type, published.deployment.spec.name) == ("added", "late")
        bus.publish(DeploymentEvent("modified", first.deployment))
        changed = await anext(events)
        assert (changed.type, changed.deployment.spec.name) == ("modified", "d0")
        assert (units.opened, units.open) == (3, 0)  # an admin's events are not redacted: no read
    finally:
        await events.aclose()
    assert bus.subscriber_count == 0


async def test_a_watch_of_one_tenant_pages_through_that_tenant_only(cluster, monkeypatch):
    monkeypatch.setattr(watch, "CURRENT_PAGE", 2)
    await add_tenant(cluster, "t2")
    for name in NAMES:
        await _submit(cluster, name)
    await _submit(cluster, "other", tenant="t2")
    bus = DeploymentEventBus()
    events = watch_deployments(cluster.unit_of_work, WHO, bus, tenant="t1")
    try:
        got = [await anext(events) for _ in NAMES]
        bus.publish(DeploymentEvent("modified", got[0].deployment))
        after = await anext(events)  # not t2's "other": the pages were t1's only
    finally:
        await events.aclose()
    assert [e.deployment.spec.name for e in got] == NAMES
    assert (after.type, after.deployment.spec.tenant, after.deployment.spec.name) == ("modified", "t1", "d0")


T1 = Principal("t1-token", Role.TENANT, tenant="t1")


@pytest.mark.parametrize(("who", "expected"), [(T1, [("t1", "d3")]), (WHO, [("t1", "d3"), ("t2", "d3")])],
                         ids=["tenant", "admin"])
async def test_a_watch_of_one_name_reads_only_the_deployments_of_that_name(cluster, monkeypatch, who, expected):
    """`maiactl wait` watches one deployment: its current state is read by name in the query, not
    every deployment the caller may see filtered afterwards (10,000+ rows for each wait). A tenant
    caller still sees its own tenant's only."""
    monkeypatch.setattr(watch, "CURRENT_PAGE", 2)
    await add_tenant(cluster, "t2")
    published = {name: await _submit(cluster, name) for name in NAMES}
    await _submit(cluster, "d3", tenant="t2")
    read: list[tuple[str, str]] = []
    with_ids = repo.deployments_with_ids

    async def reading(*args, **kwargs):
        found = await with_ids(*args, **kwargs)
        read.extend((named.row.tenant_id, named.row.name) for named in found.values())
        return found

    monkeypatch.setattr(repo, "deployments_with_ids", reading)
    units, bus = CountingUnitsOfWork(cluster), DeploymentEventBus()
    batches = watch_deployment_batches(units, who, bus, name="d3")
    try:
        listed = await anext(batches)
        assert [(e.type, e.deployment.spec.tenant, e.deployment.spec.name) for e in listed] == [
            ("added", *key) for key in expected]
        assert read == expected
        assert units.opened == 1  # one page, not a page per CURRENT_PAGE of every deployment
        bus.publish(published["d0"])
        bus.publish(published["d3"])
        assert await anext(batches) == [published["d3"]]  # the changes after it: filtered as before
    finally:
        await batches.aclose()


async def test_batches_take_every_waiting_change_in_order_up_to_the_bound(cluster, monkeypatch):
    """What waits for a batched watcher goes out in as few lists as the bound allows, in order:
    the current state a page a list, then the changes published meanwhile."""
    monkeypatch.setattr(watch, "CURRENT_PAGE", 2)
    monkeypatch.setattr(watch, "WATCH_BATCH", 3)
    for name in NAMES:
        await _submit(cluster, name)
    bus = DeploymentEventBus()
    batches = watch_deployment_batches(cluster.unit_of_work, WHO, bus)
    try:
        first = await anext(batches)
        changes = [DeploymentEvent("modified", e.deployment) for e in first] * 4  # 8 changes
        for event in changes:
            bus.publish(event)
        rest = [await anext(batches) for _ in range(2)]  # the rest of the current state
        assert [[e.deployment.spec.name for e in b] for b in [first, *rest]] == [["d0", "d1"], ["d2", "d3"], ["d4"]]
        lists = [await anext(batches) for _ in range(3)]
        assert [len(b) for b in lists] == [3, 3, 2]
        assert [e for b in lists for e in b] == changes
    finally:
        await batches.aclose()


def _with_placements(event: DeploymentEvent, shards: int) -> DeploymentEvent:
    """`event` as a gang of `shards` placed shards would carry it (its whole view in each event)."""
    placements = tuple(ShardPlacementView(replica=0, shard=i, node=f"n{i}", rack="r1", accelerator_indices=(0,))
                       for i in range(shards))
    return DeploymentEvent("modified", replace(event.deployment, placements=placements))


async def _lists_through(batches: AsyncIterator[list[DeploymentEvent]],
                         last: Callable[[DeploymentEvent], bool]) -> list[list[DeploymentEvent]]:
    """The lists up to the one holding the event `last` picks (never waiting past it)."""
    lists = [await anext(batches)]
    while not any(map(last, lists[-1])):
        lists.append(await anext(batches))
    return lists


async def test_a_list_of_heavy_events_is_cut_where_its_weight_runs_out(cluster):
    """The handler converts a list in one step of the event loop, and an event costs by its
    placements: a hundred events of a 64-shard gang would hold the loop ~10 ms. Lists are cut by
    weight (each within `WATCH_BATCH_WEIGHT`), in order; an event over the bound goes alone."""
    listed = await _submit(cluster, "d0")
    bus = DeploymentEventBus()
    batches = watch_deployment_batches(cluster.unit_of_work, WHO, bus)
    try:
        await anext(batches)
        gang = _with_placements(listed, 64)
        end = DeploymentEvent("modified", listed.deployment)
        published = [gang] * 30 + [end]
        for event in published:
            bus.publish(event)
        lists = await _lists_through(batches, lambda e: e is end)
        weights = [sum(map(watch.event_weight, b)) for b in lists]
        assert len(lists) > 1 and max(weights) <= watch.WATCH_BATCH_WEIGHT
        # each list is cut only where the next event would not fit
        assert all(w + watch.event_weight(b[0]) > watch.WATCH_BATCH_WEIGHT for w, b in zip(weights, lists[1:]))
        assert [e for b in lists for e in b] == published
        huge = [_with_placements(listed, watch.WATCH_BATCH_WEIGHT) for _ in range(2)]  # each over the bound: alone
        for event in (huge[0], end, huge[1]):
            bus.publish(event)
        assert await _lists_through(batches, lambda e: e is huge[1]) == [[huge[0]], [end], [huge[1]]]
    finally:
        await batches.aclose()


async def test_a_page_of_the_current_state_is_cut_by_weight_too(cluster, monkeypatch):
    monkeypatch.setattr(watch, "CURRENT_PAGE", 5)
    monkeypatch.setattr(watch, "WATCH_BATCH_WEIGHT", 2 * watch.EVENT_WEIGHT)  # two unplaced deployments a list
    for name in NAMES:
        await _submit(cluster, name)
    batches = watch_deployment_batches(cluster.unit_of_work, WHO, DeploymentEventBus())
    try:
        lists = await _lists_through(batches, lambda e: e.deployment.spec.name == "d4")
        assert [[e.deployment.spec.name for e in b] for b in lists] == [["d0", "d1"], ["d2", "d3"], ["d4"]]
    finally:
        await batches.aclose()


async def test_a_batched_watcher_cut_off_gets_what_came_before_the_end_then_unavailable(cluster):
    await _submit(cluster, "d0")
    bus = DeploymentEventBus(queue_size=3)
    batches = watch_deployment_batches(cluster.unit_of_work, WHO, bus)
    try:
        [listed] = await anext(batches)
        changes = [DeploymentEvent("modified", listed.deployment) for _ in range(4)]
        for event in changes:  # the fourth is one too many: the oldest makes room for the end
            bus.publish(event)
        assert await anext(batches) == changes[1:3]
        with pytest.raises(Unavailable, match="fell behind"):
            await anext(batches)
    finally:
        await batches.aclose()
