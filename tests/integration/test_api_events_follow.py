"""ListEvents over gRPC as a follower reads it (`maiactl get events -w`, `controller/cli/follow.py`):
oldest first after an id, or from the start with `oldest_first`; the newest without either."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from controller import limits
from controller.api.server import ControllerApp
from controller.store.repositories import NewEvent, record_events
from controller.store.retention import prune_events
from controller.store import models as m
from grpc_harness import Stubs, admin_token_of, issue_token, running_controller, spec
from maia.v1 import admin_pb2, deployments_pb2


def _node_events(*object_ids: str, kind: str = "node.down", at: datetime | None = None) -> list[NewEvent]:
    return [NewEvent(actor="test", kind=kind, object_kind="node", object_id=i, at=at) for i in object_ids]


@asynccontextmanager
async def _with_events(migrated_db_url: str, tmp_path: Path, events: list[NewEvent]) -> AsyncIterator[tuple[ControllerApp, Stubs]]:
    """A running controller whose history holds `events` (one transaction), and an admin's stubs."""
    async with running_controller(migrated_db_url, tmp_path) as app:
        async with app.db.unit_of_work() as uow:
            await record_events(uow.session, events)
            await uow.commit()
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            yield app, stubs
        finally:
            await stubs.channel.close()


async def test_a_follower_reads_a_burst_from_the_start_in_full(migrated_db_url: str, tmp_path: Path) -> None:
    async with _with_events(migrated_db_url, tmp_path, _node_events(*(f"burst-{i:04}" for i in range(1500)))) as (_, stubs):
        async def ask(**fields: object) -> list[str]:
            reply = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", limit=1000, **fields))
            return [e.object_id for e in reply.events]

        newest = await ask()
        assert newest[0] == "burst-0500" and newest[-1] == "burst-1499"  # the newest 1,000
        first = await ask(oldest_first=True)
        assert first[0] == "burst-0000" and first[-1] == "burst-0999"
        reply = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", limit=1000,
                                                                         oldest_first=True))
        rest = await ask(after_id=reply.events[-1].id)
        assert rest == [f"burst-{i:04}" for i in range(1000, 1500)]


async def test_after_an_id_retention_deleted_past_is_out_of_range_and_says_where_to_resume(
        migrated_db_url: str, tmp_path: Path) -> None:
    """A reader resuming after an id whose successors retention deleted got the rest as if those
    had never been; now it is told, with the highest id deleted to resume after."""
    old = datetime.now(timezone.utc) - timedelta(days=30)
    events = _node_events("old-0", "old-1", "old-2", at=old) + _node_events("new", kind="node.up")
    async with _with_events(migrated_db_url, tmp_path, events) as (app, stubs):
        ids = [e.id for e in (await stubs.admin.ListEvents(
            admin_pb2.ListEventsRequest(object_kind="node", oldest_first=True))).events]
        async with app.db.unit_of_work() as uow:
            assert (await prune_events(uow.session, datetime.now(timezone.utc) - timedelta(days=1), 2)).count == 2
            await uow.commit()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", after_id=ids[0]))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert info.value.details() == (
            f"events after id {ids[0]} were deleted by the controller's event retention (--event-ttl) "
            f"up to id {ids[1]}; ask after id {ids[1]}, or without after_id")
        assert (limits.EVENTS_DELETED_THROUGH_METADATA_KEY, str(ids[1])) in tuple(info.value.trailing_metadata())
        # After the mark, and from the start, the rest is there.
        after = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", after_id=ids[1]))
        assert [e.object_id for e in after.events] == ["old-2", "new"]
        whole = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", oldest_first=True))
        assert [e.object_id for e in whole.events] == ["old-2", "new"]


async def test_a_reply_says_how_far_its_read_reached_whatever_the_filter(migrated_db_url: str, tmp_path: Path) -> None:
    """A follower of a quiet object moves on to it (`read_through`) rather than asking after that
    object's last event for ever; a full page of the oldest after an id reached its last only."""
    async with _with_events(migrated_db_url, tmp_path, _node_events(*(f"n{i % 2}" for i in range(6)))) as (_, stubs):
        every = (await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(oldest_first=True))).events
        newest = every[-1].id
        first_n0 = next(e.id for e in every if e.object_id == "n0")
        of_n0 = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", object_id="n0",
                                                                         after_id=first_n0))
        assert [e.object_id for e in of_n0.events] == ["n0", "n0"] and of_n0.read_through == newest
        assert of_n0.events[-1].id < newest  # the last event was n1's
        page = await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(after_id=every[0].id, limit=2))
        assert page.read_through == page.events[-1].id == every[2].id


async def test_a_tenant_reads_how_far_its_own_read_reached_not_the_whole_historys(migrated_db_url: str, tmp_path: Path) -> None:
    """`read_through` gave a tenant token the newest id of every tenant's history (their rate of
    events); a tenant's is its own last, or the retention mark, whichever is higher."""
    async with _with_events(migrated_db_url, tmp_path, []) as (app, stubs):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("svc", tenant="lab")))
        async with app.db.unit_of_work() as uow:  # other objects' events, after the deployment's
            await record_events(uow.session, _node_events("n1", "n2", "n3"))
            await uow.commit()
        lab = Stubs.connect(app.address, await issue_token(app.db, "tenant", tenant="lab"))
        try:
            request = admin_pb2.ListEventsRequest(object_kind="deployment", object_id="svc", oldest_first=True)
            # Read first: the reconciler may write more of svc's events meanwhile (its reasons).
            newest = (await stubs.admin.ListEvents(admin_pb2.ListEventsRequest(limit=1))).events[-1].id
            own = await lab.admin.ListEvents(request)
            every = await stubs.admin.ListEvents(request)
            assert own.events and own.read_through == own.events[-1].id  # its own last, not the nodes'
            assert every.read_through >= newest  # an admin's: the whole history's
            async with app.db.unit_of_work() as uow:
                await uow.session.execute(m.EventRetentionMark.__table__.update().values(deleted_through=newest - 1))
                await uow.commit()
            seen = await lab.admin.ListEvents(request)  # the mark, told to anyone (or its own last, if later)
            assert seen.read_through == max(newest - 1, seen.events[-1].id)
        finally:
            await lab.channel.close()
