"""A real controller deletes events past `--event-ttl` as it leads: what `maiactl get events`
lists loses them, the isolation watchdog's alarms stay, `/metrics` counts the deletions; with
`--event-ttl 0` it has no such task at all. Likewise audit entries past `--audit-ttl`: `maiactl
audit verify` then checks the chain from the first entry kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from controller.api.server import ControllerApp
from controller.cli.main import main
from controller.config import Config
from controller.store import audit
from controller.store.db import Database
from controller.store.models import utcnow
from controller.store.repositories import NewEvent, record_events
from controller.watchdog import EVENT_KIND
from grpc_harness import Stubs, admin_token_of, eventually
from maia.v1 import admin_pb2, audit_pb2
from test_metrics import scrape, value

TTL_S = 3600.0


def _config(migrated_db_url: str, tmp_path: Path, **more: object) -> Config:
    return Config(listen="127.0.0.1:0", db_url=migrated_db_url, metrics_listen="127.0.0.1:0",
                  bootstrap_admin_token_file=str(tmp_path / "admin.token"), **more)  # type: ignore[arg-type]


@pytest.fixture
async def app(migrated_db_url: str, tmp_path: Path) -> AsyncIterator[ControllerApp]:
    app = ControllerApp(_config(migrated_db_url, tmp_path, event_ttl_s=TTL_S))
    assert app.retention is not None and app.retention.ttl_s == TTL_S
    app.retention.interval_s = 0.1  # a pass every 0.1 s rather than every minute
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


async def test_the_leader_deletes_events_past_the_ttl_and_keeps_the_alarms(app: ControllerApp) -> None:
    old = utcnow() - timedelta(seconds=TTL_S + 60)
    async with app.db.unit_of_work() as uow:
        await record_events(uow.session, [
            NewEvent(actor="test", kind="node.down", object_kind="node", object_id="gone-1", at=old),
            NewEvent(actor="test", kind="node.down", object_kind="node", object_id="gone-2", at=old),
            NewEvent(actor="test", kind=EVENT_KIND, object_kind="node", object_id="alarmed", at=old,
                     data={"rule": "exclusion", "scope": "node alarmed", "tenants": ["a", "b"]}),
            NewEvent(actor="test", kind="node.up", object_kind="node", object_id="recent")])
        await uow.commit()
    stubs = Stubs.connect(app.address, admin_token_of(app))
    try:
        listed = await eventually(
            lambda: stubs.admin.ListEvents(admin_pb2.ListEventsRequest(object_kind="node", limit=1000)),
            lambda reply: not {"gone-1", "gone-2"} & {e.object_id for e in reply.events},
            what="the events past the TTL deleted")
        assert {"alarmed", "recent"} <= {e.object_id for e in listed.events}
        samples = await scrape(app.metrics_address)
        assert value(samples, "maia_events_pruned_total") == 2
    finally:
        await stubs.channel.close()


async def test_an_event_ttl_of_zero_runs_no_retention(migrated_db_url: str, tmp_path: Path) -> None:
    app = ControllerApp(_config(migrated_db_url, tmp_path, event_ttl_s=0))
    assert app.retention is None
    await app.start()
    try:
        assert "event-retention" not in {task.get_name() for task in asyncio.all_tasks()}
    finally:
        await app.stop(grace_s=1.0)


async def test_the_leader_deletes_audit_entries_past_the_ttl_and_verify_checks_from_the_first_kept(
        database: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with database.unit_of_work() as uow:  # three entries of two days ago, before the controller's own
        await audit.append(uow.session, [audit.AuditRecord(actor="old", action=f"/maia.v1.Old/{i}") for i in range(3)],
                           at=utcnow() - timedelta(days=2))
        await uow.commit()
    app = ControllerApp(_config(database.url, tmp_path, audit_ttl_s=24 * 3600.0))
    assert app.audit_retention is not None
    app.audit_retention.interval_s = 0.1
    await app.start()
    stubs = Stubs.connect(app.address, admin_token_of(app))
    try:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-a"))  # an entry of now, after the old ones
        await eventually(lambda: scrape(app.metrics_address),
                         lambda samples: value(samples, "maia_audit_entries_pruned_total") == 3,
                         what="the three old audit entries deleted")
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["audit", "verify", "--controller", app.address,
                                              "--token", admin_token_of(app)])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("audit log intact: ") and "from entry 4 (those before it deleted" in out
        assert "/maia.v1.Old/" not in str(await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest()))
    finally:
        await stubs.channel.close()
        await app.stop(grace_s=1.0)
