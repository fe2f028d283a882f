"""What is stored about several tenants, as one of them reads it: never another tenant's id.

- The isolation watchdog writes one audit entry per tenant an alarm involves, each naming all of
  them ("accelerator ... shared with others: alpha/secret-model-alpha, bravo/chat"). bravo's
  ListAuditEvents shows its entry with alpha redacted (and no hashes to test guesses against);
  an admin reads the entries as stored, and the chain is intact. The alarm is driven as the
  watchdog's own tests drive it: a placement changed by hand, behind the controller's back.
- Events outlive the tenants they name: lab-c's `chat` was refused naming lab-d ("rack-00 holds
  lab-d (dedicated_rack)"); after lab-d is deleted, lab-c still reads "another tenant" there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from google.protobuf import json_format
from sqlalchemy import text

from controller.api.server import ControllerApp
from controller.watchdog import EVENT_KIND
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, audit_pb2, common_pb2, deployments_pb2

D, A = deployments_pb2, admin_pb2
SECRET = "secret-model-alpha"


async def _share_an_accelerator_by_hand(app: ControllerApp) -> None:
    """bravo's shard moved onto alpha's accelerator by an UPDATE, bypassing the controller (the
    attack tests/store/test_watchdog.py makes)."""
    async with app.db.engine.begin() as conn:
        await conn.execute(text(
            "UPDATE placements SET accelerator_indices = (SELECT p.accelerator_indices FROM placements p "
            "JOIN deployments d ON d.id = p.deployment_id WHERE d.tenant_id = 'alpha') "
            "WHERE deployment_id = (SELECT id FROM deployments WHERE tenant_id = 'bravo' AND name = 'chat')"))


def _alarms(events: Iterable[audit_pb2.AuditEvent]) -> list[audit_pb2.AuditEvent]:
    return [e for e in events if e.action == EVENT_KIND]


async def _running(stubs: Stubs, tenant: str, name: str) -> None:
    await stubs.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec(name, tenant)))
    await eventually(lambda: stubs.deployments.GetDeployment(D.GetDeploymentRequest(tenant=tenant, name=name)),
                     lambda d: d.phase == RUNNING, what=f"{tenant}/{name} running")


@pytest.fixture
async def bravo(controller_app: ControllerApp, stubs: Stubs, tmp_path: Path) -> AsyncIterator[Stubs]:
    """alpha's `secret-model-alpha` and bravo's `chat` running on one node, then made to share an
    accelerator by hand; the controller's watchdog alarms. bravo's stubs."""
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    for tenant in ("alpha", "bravo"):
        await stubs.admin.CreateTenant(A.Tenant(id=tenant))
    fleet = SimFleet(controller_app.address, racks=1, nodes_per_rack=1, log_dir=tmp_path,
                     token=await issue_token(controller_app.db, "node-bootstrap"))
    bravo = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="bravo"))
    try:
        await eventually(lambda: stubs.admin.ListNodes(A.ListNodesRequest()),
                         lambda r: any(n.connected for n in r.nodes), what="the agent connected")
        for tenant, name in (("alpha", SECRET), ("bravo", "chat")):
            await _running(stubs, tenant, name)
        await _share_an_accelerator_by_hand(controller_app)
        await eventually(lambda: stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant="bravo")),
                         lambda page: len(_alarms(page.events)) >= 1, what="the watchdog's alarm audited for bravo")
        yield bravo
    finally:
        await bravo.channel.close()
        await fleet.stop()


async def test_a_tenant_reads_its_alarms_entry_redacted_and_an_admin_whole(stubs: Stubs, bravo: Stubs) -> None:
    page = await bravo.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    alarms = _alarms(page.events)
    assert alarms and {e.tenant for e in page.events} == {"bravo"}
    wire = page.SerializeToString()
    assert b"alpha" not in wire and SECRET.encode() not in wire
    details = [json_format.MessageToDict(e.detail) for e in alarms]
    assert all(d["tenants"] == ["bravo"] for d in details)
    messages = " | ".join(d["message"] for d in details)
    assert "another tenant's deployment, bravo/chat" in messages  # its own stays named
    assert all(e.hash == "" and e.prev_hash == "" for e in page.events)

    # An admin reads the same entries as stored (the redaction is of what a tenant reads).
    whole = await stubs.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant="bravo"))
    assert {e.seq for e in page.events} <= {e.seq for e in whole.events}  # (more may have come since)
    details = [json_format.MessageToDict(e.detail) for e in _alarms(whole.events)]
    assert all(d["tenants"] == ["alpha", "bravo"] for d in details)
    assert any(f"alpha/{SECRET}, bravo/chat" in d["message"] for d in details)
    assert all(len(e.hash) == 64 and len(e.prev_hash) == 64 for e in whole.events)
    verified = await stubs.audit.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest())
    assert verified.intact and verified.entries >= len(whole.events)


async def test_a_deleted_tenant_stays_redacted_in_the_events_that_name_it(
        controller_app: ControllerApp, stubs: Stubs, tmp_path: Path) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    await stubs.admin.CreateTenant(A.Tenant(id="lab-d", isolation=common_pb2.ISOLATION_DEDICATED_RACK))
    await stubs.admin.CreateTenant(A.Tenant(id="lab-c"))
    fleet = SimFleet(controller_app.address, racks=1, nodes_per_rack=1, log_dir=tmp_path,
                     token=await issue_token(controller_app.db, "node-bootstrap"))
    lab_c = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab-c"))
    chat_events = A.ListEventsRequest(object_kind="deployment", object_id="chat")
    try:
        await eventually(lambda: stubs.admin.ListNodes(A.ListNodesRequest()),
                         lambda r: any(n.connected for n in r.nodes), what="the agent connected")
        await stubs.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("big", "lab-d")))
        await eventually(lambda: stubs.deployments.GetDeployment(D.GetDeploymentRequest(tenant="lab-d", name="big")),
                         lambda d: d.phase == RUNNING, what="lab-d's big running")
        await lab_c.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("chat", "")))
        await eventually(lambda: stubs.admin.ListEvents(A.ListEventsRequest(
                             object_kind="deployment", object_id="chat", tenant="lab-c")),
                         lambda r: b"rack-00 holds lab-d" in r.SerializeToString(),
                         what="chat refused, naming lab-d")
        before = await lab_c.admin.ListEvents(chat_events)
        assert b"holds another tenant" in before.SerializeToString() and b"lab-d" not in before.SerializeToString()

        await stubs.deployments.DeleteDeployment(D.DeleteDeploymentRequest(tenant="lab-d", name="big"))
        await eventually(lambda: stubs.deployments.ListDeployments(D.ListDeploymentsRequest(tenant="lab-d")),
                         lambda r: not r.deployments, what="lab-d's big deleted")
        await stubs.admin.DeleteTenant(A.DeleteTenantRequest(id="lab-d"))

        after = await lab_c.admin.ListEvents(chat_events)
        assert len(after.events) >= len(before.events)
        assert b"lab-d" not in after.SerializeToString() and b"holds another tenant" in after.SerializeToString()
        admin = await stubs.admin.ListEvents(A.ListEventsRequest(object_kind="deployment", object_id="chat",
                                                                 tenant="lab-c"))
        assert b"rack-00 holds lab-d" in admin.SerializeToString()  # stored as it was
    finally:
        await lab_c.channel.close()
        await fleet.stop()
