"""The leader's watchers are never told a deployment submitted again is deleted: a pass's
`deleted` publish runs in commit order behind the ones before it (`reconcile/publishing.py`), and
one of those may wait for the database (a read tried again after a blip). Meanwhile the name is
free, a client submits it again, and its `added` goes out at once: the late `deleted` told the
watchers (and `maiactl wait`) the live deployment was gone (found in review). The bus drops an
event of a row older than one of its key it told of (`DeploymentEventBus`); followers check
another controller's deletions against the database (`PeerMessages`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from controller.api.server import ControllerApp
from controller.reconcile import Reconciler
from controller.store.db import Database
from controller.store.notify import LocalChannel
from controller.usecases import deployments
from controller.usecases.deployments import views_of
from controller.usecases.ports import RecordingSignals
from controller.usecases.watch import DeploymentEventBus, watch_deployments
from uc_builders import WHO, deployment


async def _use_case(db: Database, bus: DeploymentEventBus, call: Any) -> None:
    signals = RecordingSignals()
    async with db.unit_of_work() as uow:
        await call(uow, signals)
    for event in signals.events:  # what `AppSignals.publish` does: this controller's watchers
        bus.publish(event)


def _submit(name: str) -> Any:
    return lambda uow, signals: deployments.submit_deployment(uow, WHO, deployment(name, accelerators=1), signals)


async def test_a_late_deleted_publish_of_a_name_submitted_again_is_not_told(cluster: Database) -> None:
    bus = DeploymentEventBus()
    app = SimpleNamespace(bus=bus, channel=LocalChannel(), db=cluster)

    async def publish(keys: set[str], deleted: list[Any], views: list[Any] | None = None) -> None:
        await ControllerApp._publish_deployments(app, keys, deleted, views)  # type: ignore[arg-type]

    up = asyncio.Event()
    up.set()

    async def read_views(uow: Any, keys: set[str]) -> list[Any]:
        if not up.is_set():
            raise OSError("connection refused")  # a database blip: the publisher tries again
        return await views_of(uow, keys)

    loop = Reconciler(cluster, push=lambda nodes: None, publish=publish, read_views=read_views,
                      interval_s=0.05, solve_time_limit_ms=60_000, backoff_s=0.0)
    for name in ("gone", "a"):
        await _use_case(cluster, bus, _submit(name))
    await loop.reconcile_once()
    await loop.published()
    told: list[tuple[str, str]] = []

    async def watch() -> None:
        async for event in watch_deployments(cluster.unit_of_work, WHO, bus):
            if event.deployment.spec.name == "gone":
                told.append((event.type, event.deployment.phase))

    watcher = asyncio.create_task(watch())
    try:
        while not told:  # the watch's first answer: gone as it is
            await asyncio.sleep(0.01)
        up.clear()
        await _use_case(cluster, bus, _submit("b"))
        await loop.reconcile_once(wait_published=False)  # b placed: its publish waits for the database
        await _use_case(cluster, bus, lambda uow, s: deployments.delete_deployment(uow, WHO, "gone", s))
        await loop.reconcile_once(wait_published=False)  # gone's row removed: its `deleted` queued behind
        async with cluster.unit_of_work() as uow:
            assert await views_of(uow, {"t1/gone"}) == []
        await _use_case(cluster, bus, _submit("gone"))  # the name is free: submitted again
        up.set()
        await loop.published()
        await asyncio.sleep(0.1)  # what the watch has to hand on
    finally:
        watcher.cancel()
    async with cluster.unit_of_work() as uow:
        assert [v.phase for v in await views_of(uow, {"t1/gone"})] == ["pending"]
    assert told[-1] == ("added", "pending") and ("modified", "deleting") in told


def test_the_bus_drops_what_it_hears_of_a_row_a_newer_one_of_its_key_replaced() -> None:
    from datetime import datetime, timedelta

    from dataclasses import replace

    from controller.domain.values import DeploymentEvent, DeploymentView

    bus = DeploymentEventBus()
    queue = bus.subscribe()
    old, new = datetime(2026, 12, 7, 12, 0), datetime(2026, 12, 7, 12, 0) + timedelta(seconds=1)

    def event(kind: str, at: datetime | None, name: str = "svc") -> DeploymentEvent:
        return DeploymentEvent(kind, DeploymentView(spec=replace(deployment(name), tenant="t1"), phase="pending",
                                                    created_at=at))

    for told in (event("added", old), event("added", new), event("modified", old), event("deleted", old),
                 event("modified", new), event("deleted", new), event("added", old),  # gone: told again
                 event("deleted", None, "other"), event("added", old, "other")):
        bus.publish(told)
    seen = []
    while not queue.empty():
        e = queue.get_nowait()
        seen.append((e.type, e.deployment.spec.name, e.deployment.created_at))
    assert seen == [("added", "svc", old), ("added", "svc", new), ("modified", "svc", new), ("deleted", "svc", new),
                    ("added", "svc", old), ("deleted", "other", None), ("added", "other", old)]
