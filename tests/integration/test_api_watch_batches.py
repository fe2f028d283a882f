"""WatchDeploymentBatches on the real server: WatchDeployments' events, in the same order,
several to a message (the current state a page at a time)."""

from __future__ import annotations

from grpc_harness import Stubs, spec
from maia.v1 import deployments_pb2

D = deployments_pb2
NAMES = ["a1", "a2", "a3", "a4", "a5"]


def _key(event: D.DeploymentEvent) -> tuple[int, str, int, int]:
    d = event.deployment
    return event.type, d.spec.name, d.phase, d.generation


async def test_the_batches_carry_the_watchs_events_in_order(seeded: Stubs) -> None:
    for name in NAMES:
        await seeded.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec(name)))
    one = seeded.deployments.WatchDeployments(D.WatchDeploymentsRequest())
    batched = seeded.deployments.WatchDeploymentBatches(D.WatchDeploymentsRequest())
    try:
        first = await batched.read()
        # the current state (the 5 and `existing`, all on one page) is one message
        assert [(e.type, e.deployment.spec.name) for e in first.events] == \
            [(D.DeploymentEvent.TYPE_ADDED, n) for n in [*NAMES, "existing"]]
        # The single watch's listing is read before anything changes: a handler started late
        # under load would otherwise list the state after the changes below.
        events = [await one.read() for _ in range(len(first.events))]
        await seeded.deployments.DeleteDeployment(D.DeleteDeploymentRequest(name="a3"))
        await seeded.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("late")))
        await seeded.deployments.DeleteDeployment(D.DeleteDeploymentRequest(name="late"))

        def ends(event: D.DeploymentEvent) -> bool:  # the last change made above, once it is gone
            return event.type == D.DeploymentEvent.TYPE_DELETED and event.deployment.spec.name == "late"

        async for event in one:
            events.append(event)
            if ends(event):
                break
        flattened = list(first.events)
        async for batch in batched:
            assert batch.events  # never an empty message
            flattened.extend(batch.events)
            if any(ends(e) for e in batch.events):
                flattened = flattened[:next(i for i, e in enumerate(flattened) if ends(e)) + 1]
                break
    finally:
        one.cancel()
        batched.cancel()
    assert [_key(e) for e in flattened] == [_key(e) for e in events]
    assert {e.deployment.spec.name for e in events if e.type == D.DeploymentEvent.TYPE_DELETED} == {"a3", "late"}
