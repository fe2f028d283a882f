"""Another controller's DEPLOYMENTS messages handed on to this controller's watchers
(`PeerMessages._republish_heard`): in the order heard, and a read that fails ends the watches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import controller.api.peers as peers
from controller.api.peers import DEPLOYMENTS, PeerMessages
from controller.domain.values import DeploymentSpec, DeploymentView, ShardSpec
from controller.usecases.watch import _CLOSED, DeploymentEventBus


def _view(name: str, phase: str) -> DeploymentView:
    return DeploymentView(spec=DeploymentSpec(name=name, tenant="t1", replicas=1, shards_per_replica=1,
                                              shard=ShardSpec(accelerators=1)), phase=phase)


class _Database:
    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[object]:
        yield object()


def _peers(bus: DeploymentEventBus) -> PeerMessages:
    return PeerMessages(db=_Database(), hub=None, reconciler=None, authn=None, bus=bus,  # type: ignore[arg-type]
                        streams=None, election=None)  # type: ignore[arg-type]


def _drain(queue: asyncio.Queue) -> list[tuple[str, str, str]]:
    got = []
    while not queue.empty():
        event = queue.get_nowait()
        got.append((event.type, event.deployment.spec.name, event.deployment.phase))
    return got


async def test_a_deleted_heard_during_a_slow_read_is_handed_on_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`modified:x` read while x was DELETING, its read slow to end, then `deleted:x`: the watchers
    are told x modified, then deleted (they were told deleted, then modified: x stayed for them)."""
    release = asyncio.Event()
    reads: list[set[str]] = []

    async def views_of(uow: Any, keys: set[str]) -> list[DeploymentView]:
        reads.append(set(keys))
        if len(reads) == 1:
            await release.wait()  # read before the deletion committed, its unit of work ending late
            return [_view("x", "deleting")]
        return []  # x gone

    monkeypatch.setattr(peers, "views_of", views_of)
    bus = DeploymentEventBus()
    queue = bus.subscribe()
    messages = _peers(bus)
    messages.notified(DEPLOYMENTS, "modified:t1/x")
    await asyncio.sleep(0)
    messages.notified(DEPLOYMENTS, "deleted:t1/x")
    messages.notified(DEPLOYMENTS, "modified:t1/y")
    for _ in range(5):
        await asyncio.sleep(0)
    assert reads == [{"t1/x"}]  # the second and third wait for the first
    release.set()
    while messages._handling:
        await asyncio.sleep(0.01)
    assert _drain(queue) == [("modified", "x", "deleting"), ("deleted", "x", "deleting")]
    assert reads == [{"t1/x"}, {"t1/y"}, {"t1/x"}]  # the two heard meanwhile, read together


async def test_a_failed_read_ends_the_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that fails tells the watchers nothing wrong (y may have been submitted again since
    its deletion) and leaves no silent gap (z changed): their watches end, to start again."""
    async def views_of(uow: Any, keys: set[str]) -> list[DeploymentView]:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(peers, "views_of", views_of)
    bus = DeploymentEventBus()
    queue = bus.subscribe()
    messages = _peers(bus)
    messages.notified(DEPLOYMENTS, "deleted:t1/y,modified:t1/z")
    while messages._handling:
        await asyncio.sleep(0.01)
    assert bus.subscriber_count == 0
    assert queue.qsize() == 1 and queue.get_nowait() is _CLOSED  # the end alone: nothing told
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
