"""The in-process bus behind WatchDeployments: how far behind a watcher may fall."""

from __future__ import annotations

from controller.domain.values import DeploymentEvent, DeploymentSpec, DeploymentView, ShardSpec
from controller.usecases.watch import _CLOSED, DeploymentEventBus


def _event(i: int) -> DeploymentEvent:
    spec = DeploymentSpec(name=f"d{i}", tenant="t", replicas=1, shards_per_replica=1, shard=ShardSpec(accelerators=1))
    return DeploymentEvent("modified", DeploymentView(spec=spec, phase="scheduled"))


async def test_a_commit_that_changes_thousands_of_deployments_keeps_its_watchers() -> None:
    """One plan commit publishes an event per deployment it changed before a watcher runs."""
    bus = DeploymentEventBus()
    queue = bus.subscribe()
    for i in range(5000):
        bus.publish(_event(i))
    assert bus.subscriber_count == 1
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [e.deployment.spec.name for e in got] == [f"d{i}" for i in range(5000)]


async def test_a_watcher_beyond_the_bound_is_cut_off_with_the_end_marker() -> None:
    bus = DeploymentEventBus(queue_size=3)
    queue = bus.subscribe()
    for i in range(4):
        bus.publish(_event(i))
    assert bus.subscriber_count == 0
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    assert got[-1] is _CLOSED
