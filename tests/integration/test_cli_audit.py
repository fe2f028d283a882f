"""`maiactl audit list|verify` against a real controller: listing with filters and paging, and
verify's exit codes after tampering with the database directly."""

from __future__ import annotations

import asyncio
import json
from datetime import timezone

import pytest
from sqlalchemy import text

from controller.api.server import ControllerApp
from controller.cli.commands.audit import parse_since
from controller.cli.main import main
from grpc_harness import Stubs, admin_token_of, topology
from maia.v1 import admin_pb2, audit_pb2


async def _maiactl(app: ControllerApp, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, [*argv, "--controller", app.address, "--token", admin_token_of(app)])
    out, err = capsys.readouterr()
    return code, out, err


async def _seed(stubs: Stubs) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    for tenant in ("lab-a", "lab-b", "lab-c"):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))


async def test_list_filters_by_tenant_and_pages(controller_app: ControllerApp, stubs: Stubs,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    await _seed(stubs)
    code, out, _ = await _maiactl(controller_app, capsys, "audit", "list", "--tenant", "lab-b", "-o", "json")
    assert code == 0
    events = json.loads(out)["items"]
    assert [(e["object_id"], e["outcome"]) for e in events] == [("lab-b", "OK")]

    code, out, _ = await _maiactl(controller_app, capsys, "audit", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["SEQ", "TIME", "ACTOR"]
    assert [line.split()[5] for line in out.splitlines()[1:]] == ["ApplyTopology"] + ["CreateTenant"] * 3

    code, out, _ = await _maiactl(controller_app, capsys, "audit", "list", "--since", "1h", "--limit", "2", "-o", "name")
    assert (code, out.split()) == (0, ["audit/1", "audit/2"])
    code, out, _ = await _maiactl(controller_app, capsys, "audit", "list", "--since", "2999-01-01T00:00:00Z")
    assert (code, out.strip()) == (0, "(no audit entries)")

    page = await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=3))
    assert [e.seq for e in page.events] == [1, 2, 3] and page.next_page_token
    # --since to the microsecond: the entries of its second recorded before it were listed too
    second = page.events[1].at.ToDatetime(tzinfo=timezone.utc)
    code, out, _ = await _maiactl(controller_app, capsys, "audit", "list", "--since", second.isoformat(), "-o", "name")
    assert (code, out.split()) == (0, ["audit/2", "audit/3", "audit/4"])
    rest = await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(page_size=3,
                                                                             page_token=page.next_page_token))
    assert [e.seq for e in rest.events] == [4] and not rest.next_page_token


async def test_verify_exits_0_when_intact_and_names_the_first_bad_entry(controller_app: ControllerApp, stubs: Stubs,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    await _seed(stubs)
    code, out, _ = await _maiactl(controller_app, capsys, "audit", "verify")
    assert code == 0 and out.startswith("audit log intact: 4 entries; head 4:")
    head = out.split("head ")[1].strip()

    async with controller_app.db.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_log SET actor = 'nobody' WHERE seq = 2"))
    code, out, err = await _maiactl(controller_app, capsys, "audit", "verify")
    assert code == 1 and out == ""
    assert err.startswith("error: audit log broken at entry 2: entry 2 does not match its hash")

    async with controller_app.db.engine.begin() as conn:  # a tail removed with its head record rewritten
        original = (await conn.execute(text("SELECT hash FROM audit_log WHERE seq = 3"))).scalar_one()
        await conn.execute(text("UPDATE audit_log SET actor = 'bootstrap-admin' WHERE seq = 2"))
        await conn.execute(text("DELETE FROM audit_log WHERE seq = 4"))
        await conn.execute(text(f"UPDATE audit_head SET seq = 3, hash = '{original}'"))
    assert (await _maiactl(controller_app, capsys, "audit", "verify"))[0] == 0
    code, _, err = await _maiactl(controller_app, capsys, "audit", "verify", "--expect-head", head)
    assert code == 1 and "broken at entry 4" in err and "expected head" in err


def test_since_takes_durations_and_iso_times() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    assert parse_since("90m", now) == datetime(2026, 11, 30, 10, 30, tzinfo=timezone.utc)
    assert parse_since("2026-11-29T08:00:00", now) == datetime(2026, 11, 29, 8, 0, tzinfo=timezone.utc)
    with pytest.raises(Exception, match="neither a duration"):
        parse_since("yesterday", now)
