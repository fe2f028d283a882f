"""The watch use case held by its token (`controller.tokenstreams`): a revocation or the expiry
ends it UNAUTHENTICATED, and what was waiting for it is not delivered; another token's watch goes
on; an ended watch leaves nothing held."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from controller.domain.values import DeploymentEvent
from controller.errors import ResourceExhausted, Unauthenticated
from controller.identity import Principal, Role
from controller.tokenstreams import TokenStreams
from controller.usecases import deployments
from controller.usecases.ports import RecordingSignals
from controller.usecases.watch import DeploymentEventBus, watch_deployment_batches, watch_deployments
from uc_builders import WHO, deployment

TENANT = Principal("t1-user", Role.TENANT, token_id="0123456789abcdef", tenant="t1")
OTHER = Principal("t1-other", Role.TENANT, token_id="fedcba9876543210", tenant="t1")


async def _submitted(db) -> DeploymentEvent:  # type: ignore[no-untyped-def]
    signals = RecordingSignals()
    async with db.unit_of_work() as uow:
        await deployments.submit_deployment(uow, WHO, deployment("d0", "t1", accelerators=1), signals)
    [event] = signals.events
    return event


async def test_a_revoked_watch_ends_unauthenticated_and_delivers_nothing_more_mid_list_too(cluster) -> None:
    """Three changes wait for the watch; it has sent the first when its token is revoked: the other
    two are not sent, the watch ends "token X was revoked", and nothing stays held or subscribed.
    Another token's watch is shown all three."""
    listed = await _submitted(cluster)
    bus, streams = DeploymentEventBus(), TokenStreams()
    revoked = watch_deployments(cluster.unit_of_work, TENANT, bus, streams=streams)
    kept = watch_deployment_batches(cluster.unit_of_work, OTHER, bus, streams=streams)
    try:
        assert (await anext(revoked)).deployment.spec.name == "d0"
        assert [e.deployment.spec.name for e in await anext(kept)] == ["d0"]
        changes = [DeploymentEvent("modified", listed.deployment) for _ in range(3)]
        for event in changes:
            bus.publish(event)
        assert await anext(revoked) == changes[0]  # the list of three is taken; one sent
        assert streams.revoke([TENANT.token_id]) == 1
        with pytest.raises(Unauthenticated, match=f"^token {TENANT.token_id} was revoked$"):
            await anext(revoked)
        assert await anext(kept) == changes
        assert streams.held() == 1 and bus.subscriber_count == 1  # the ended watch let go
    finally:
        await revoked.aclose()
        await kept.aclose()
    assert streams.held() == 0 and bus.subscriber_count == 0


async def test_a_revocation_drops_the_changes_waiting_for_a_batched_watch(cluster) -> None:
    listed = await _submitted(cluster)
    bus, streams = DeploymentEventBus(), TokenStreams()
    batches = watch_deployment_batches(cluster.unit_of_work, TENANT, bus, streams=streams)
    try:
        await anext(batches)
        for _ in range(5):
            bus.publish(DeploymentEvent("modified", listed.deployment))
        streams.revoke([TENANT.token_id])
        with pytest.raises(Unauthenticated, match="was revoked"):
            await anext(batches)
    finally:
        await batches.aclose()


async def test_a_watch_ends_at_its_tokens_expiry_not_before(cluster) -> None:
    await _submitted(cluster)
    expires_at = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    who = Principal("t1-short", Role.TENANT, token_id="0123456789abcdef", tenant="t1", expires_at=expires_at)
    streams = TokenStreams()
    batches = watch_deployment_batches(cluster.unit_of_work, who, DeploymentEventBus(), streams=streams)
    try:
        await anext(batches)
        with pytest.raises(Unauthenticated, match=f"^token {who.token_id} expired at "):
            await asyncio.wait_for(anext(batches), 5)
        assert datetime.now(timezone.utc) >= expires_at
    finally:
        await batches.aclose()
    assert streams.held() == 0


async def test_a_watch_whose_token_was_revoked_after_its_call_was_authenticated_ends_as_it_opens(cluster) -> None:
    """The call was let in (its token verified), then the token was revoked before the watch was
    held (the awaits between the interceptor and the handler's first step): it ends at once, the
    current state not sent, rather than streaming until the token expires."""
    await _submitted(cluster)
    streams = TokenStreams()
    streams.revoke([TENANT.token_id])
    batches = watch_deployment_batches(cluster.unit_of_work, TENANT, DeploymentEventBus(), streams=streams)
    try:
        with pytest.raises(Unauthenticated, match="was revoked"):
            await anext(batches)
    finally:
        await batches.aclose()
    assert streams.held() == 0


async def test_a_token_holds_at_most_its_share_of_streams_and_one_more_once_one_ends(cluster) -> None:
    """A tenant's token opened 3,000 watches: every deployment event is put on each queue, and other
    tenants' updates took six times as long. A token holds `per_token` streams at most; the next is
    refused RESOURCE_EXHAUSTED (leaving nothing subscribed), and one more opens once one ended.
    Another token, and the controller itself (no token), are not counted against it."""
    await _submitted(cluster)
    bus, streams = DeploymentEventBus(), TokenStreams(per_token=2)
    watches = [watch_deployments(cluster.unit_of_work, TENANT, bus, streams=streams) for _ in range(2)]
    other = watch_deployments(cluster.unit_of_work, OTHER, bus, streams=streams)
    try:
        for watch in (*watches, other):
            assert (await anext(watch)).deployment.spec.name == "d0"
        refused = watch_deployment_batches(cluster.unit_of_work, TENANT, bus, streams=streams)
        with pytest.raises(ResourceExhausted, match=f"^token {TENANT.token_id} holds 2 open streams"):
            await anext(refused)
        assert streams.held() == 3 and bus.subscriber_count == 3
        await watches.pop().aclose()
        watches.append(watch_deployments(cluster.unit_of_work, TENANT, bus, streams=streams))
        assert (await anext(watches[-1])).deployment.spec.name == "d0"
        for _ in range(3):
            streams.admit(None)  # no token: never limited
    finally:
        for watch in (*watches, other):
            await watch.aclose()
    assert streams.held() == 0 and bus.subscriber_count == 0
