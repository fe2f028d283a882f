"""A deployment watch ends when the token it was opened with is revoked or expires.

A token is checked as a call starts, and a watch is one call: a tenant's `WatchDeployments` and
`WatchDeploymentBatches` went on delivering its deployments' events, placements and reasons
minutes after `maiactl token revoke` (and past the token's expiry), while every new call with the
token was refused. The watch now ends UNAUTHENTICATED with the words a new call is told, at once
on a revoke (on the controller that revoked it, and on another controller of the group as it hears
of it), at the expiry for an expiring token, and delivers nothing published after that; a watch of
another token goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest

from controller.api.server import ControllerApp
from controller.store.models import as_utc
from controller.store.tokens import get_token
from grpc_harness import Stubs, admin_token_of, issue_token, running_controller, spec, topology
from maia.v1 import admin_pb2, deployments_pb2

D = deployments_pb2
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
WATCHES = ["WatchDeployments", "WatchDeploymentBatches"]
ENDS_WITHIN_S = 5.0  # "at once", with room for a loaded machine; the old watch never ended


def _id(secret: str) -> str:
    return secret.split(".")[0].removeprefix("maia_")


def _events(message: D.DeploymentEvent | D.DeploymentEventBatch) -> Iterator[D.DeploymentEvent]:
    return iter(message.events) if isinstance(message, D.DeploymentEventBatch) else iter((message,))


def _names(message: D.DeploymentEvent | D.DeploymentEventBatch) -> list[str]:
    return [event.deployment.spec.name for event in _events(message)]


def _watch(stubs: Stubs, rpc: str):  # type: ignore[no-untyped-def]
    return getattr(stubs.deployments, rpc)(D.WatchDeploymentsRequest())


async def _until_ended(watch, timeout_s: float,  # type: ignore[no-untyped-def]
                       ) -> tuple[list[str], grpc.aio.AioRpcError | None]:
    """The deployments named by what the watch delivers until it ends (or `timeout_s` passes: then
    the error is None, the watch cancelled), and the error it ended with."""
    delivered: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            message = await asyncio.wait_for(watch.read(), max(0.0, deadline - time.monotonic()))
            if message is grpc.aio.EOF:
                return delivered, None
            delivered.extend(_names(message))
    except grpc.aio.AioRpcError as exc:
        return delivered, exc
    except TimeoutError:
        watch.cancel()
        return delivered, None


async def _until_named(watch, name: str) -> None:  # type: ignore[no-untyped-def]
    """Read the watch until an event names `name` (within `ENDS_WITHIN_S`)."""
    async with asyncio.timeout(ENDS_WITHIN_S):
        while name not in _names(await watch.read()):
            pass


@pytest.mark.parametrize("rpc", WATCHES)
async def test_a_tenants_watch_ends_unauthenticated_at_once_when_its_token_is_revoked(
        seeded: Stubs, controller_app: ControllerApp, rpc: str) -> None:
    """Two watches of tenant lab, opened with two of its tokens; one token is revoked: its watch
    ends UNAUTHENTICATED "token X was revoked" at once, without the deployment submitted after the
    revoke, which the other token's watch is shown."""
    revoked = await issue_token(controller_app.db, "tenant", tenant="lab", name="watcher")
    kept = await issue_token(controller_app.db, "tenant", tenant="lab", name="other-watcher")
    async with Stubs.connect(controller_app.address, revoked).channel as revoked_channel, \
            Stubs.connect(controller_app.address, kept).channel as kept_channel:
        revoked_watch, kept_watch = _watch(Stubs.on(revoked_channel), rpc), _watch(Stubs.on(kept_channel), rpc)
        try:
            assert _names(await revoked_watch.read()) == ["existing"]  # the current state: both are open
            assert _names(await kept_watch.read()) == ["existing"]
            await seeded.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=_id(revoked)))
            await seeded.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("after")))
            await _until_named(kept_watch, "after")  # published, to the watch whose token stands
            delivered, ended = await _until_ended(revoked_watch, ENDS_WITHIN_S)
        finally:
            revoked_watch.cancel()
            kept_watch.cancel()
    assert "after" not in delivered
    assert ended is not None, f"the revoked token's watch did not end; it delivered {delivered}"
    assert (ended.code(), ended.details()) == (UNAUTHENTICATED, f"token {_id(revoked)} was revoked")


@pytest.mark.parametrize("rpc", WATCHES)
async def test_a_watch_opened_with_an_expiring_token_ends_unauthenticated_at_its_expiry_not_before(
        seeded: Stubs, controller_app: ControllerApp, rpc: str) -> None:
    """`maiactl token create --tenant lab --ttl 4s`: the watch it opens ends UNAUTHENTICATED "token X
    expired at T" once T has passed (a timer per watch: nothing else happens meanwhile), never before."""
    expiring = await issue_token(controller_app.db, "tenant", tenant="lab", name="short", ttl_s=4.0)
    async with controller_app.db.unit_of_work() as uow:
        expires_at = as_utc((await get_token(uow.session, _id(expiring))).expires_at)
    async with Stubs.connect(controller_app.address, expiring).channel as channel:
        watch = _watch(Stubs.on(channel), rpc)
        assert _names(await watch.read()) == ["existing"]
        left_s = (expires_at - datetime.now(timezone.utc)).total_seconds()
        delivered, ended = await _until_ended(watch, left_s + ENDS_WITHIN_S)
        ended_at = datetime.now(timezone.utc)
    assert ended is not None, f"the expired token's watch did not end; it delivered {delivered}"
    assert (ended.code(), ended.details()) == (
        UNAUTHENTICATED, f"token {_id(expiring)} expired at {expires_at.isoformat(timespec='seconds')}")
    assert ended_at >= expires_at


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_watch_on_a_follower_ends_when_its_token_is_revoked_through_the_leader(
        migrated_db_url: str, tmp_path: Path) -> None:
    """Two controllers on one PostgreSQL: a tenant's watch on the follower ends UNAUTHENTICATED as
    the follower hears the revocation made through the leader (TOKENS_REVOKED), and is not shown the
    deployment submitted after it, which another token's watch on the follower is shown."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_controller(migrated_db_url, tmp_path / "a") as leader, \
            running_controller(migrated_db_url, tmp_path / "b") as follower, \
            Stubs.connect(leader.address, admin_token_of(leader)).channel as admin_channel:
        admin = Stubs.on(admin_channel)
        await admin.admin.ApplyTopology(topology({"rack-a": "row-a"}))
        await admin.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        await admin.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("existing")))
        deadline = time.monotonic() + 20
        while not (leader.channel.others_listening and follower.channel.others_listening):
            assert time.monotonic() < deadline, "the controllers never heard each other listen"
            await asyncio.sleep(0.1)
        revoked = await issue_token(leader.db, "tenant", tenant="lab", name="watcher")
        kept = await issue_token(leader.db, "tenant", tenant="lab", name="other-watcher")
        async with Stubs.connect(follower.address, revoked).channel as revoked_channel, \
                Stubs.connect(follower.address, kept).channel as kept_channel:
            revoked_watch = _watch(Stubs.on(revoked_channel), "WatchDeploymentBatches")
            kept_watch = _watch(Stubs.on(kept_channel), "WatchDeploymentBatches")
            try:
                assert _names(await revoked_watch.read()) == ["existing"]
                assert _names(await kept_watch.read()) == ["existing"]
                await admin.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=_id(revoked)))
                await admin.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("after")))
                await _until_named(kept_watch, "after")
                delivered, ended = await _until_ended(revoked_watch, ENDS_WITHIN_S)
            finally:
                revoked_watch.cancel()
                kept_watch.cancel()
    assert "after" not in delivered
    assert ended is not None, f"the revoked token's watch on the follower did not end; it delivered {delivered}"
    assert (ended.code(), ended.details()) == (UNAUTHENTICATED, f"token {_id(revoked)} was revoked")
