"""The solver's reasons as a tenant reads them: never another tenant's id or deployments.

lab-a (dedicated_rack) runs on the only rack; lab-c's `chat` cannot go there, and the solver says
so naming lab-a. Through every view a lab-c token has (get, list, watch, events, a dry run) the
reason is there without lab-a; an admin reads it whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.api.server import ControllerApp
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

D, A = deployments_pb2, admin_pb2


@pytest.fixture
async def lab_c(controller_app: ControllerApp, stubs: Stubs, tmp_path: Path) -> AsyncIterator[Stubs]:
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    await stubs.admin.CreateTenant(A.Tenant(id="lab-a", isolation=common_pb2.ISOLATION_DEDICATED_RACK))
    await stubs.admin.CreateTenant(A.Tenant(id="lab-c"))
    fleet = SimFleet(controller_app.address, racks=1, nodes_per_rack=1, log_dir=tmp_path,
                     token=await issue_token(controller_app.db, "node-bootstrap"))
    lab = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab-c"))
    try:
        await eventually(lambda: stubs.admin.ListNodes(A.ListNodesRequest()),
                         lambda r: any(n.connected for n in r.nodes), what="the agent connected")
        await stubs.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("big", "lab-a")))
        await eventually(lambda: stubs.deployments.GetDeployment(D.GetDeploymentRequest(name="big")),
                         lambda d: d.phase == RUNNING, what="lab-a's big running")
        await lab.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("chat", "")))
        await eventually(lambda: stubs.deployments.GetDeployment(D.GetDeploymentRequest(name="chat")),
                         lambda d: "lab-a" in str(d.reasons), what="chat refused, naming lab-a")
        yield lab
    finally:
        await lab.channel.close()
        await fleet.stop()


def _leaks(message) -> bool:
    return b"lab-a" in message.SerializeToString() or b"big" in message.SerializeToString()


async def test_a_tenant_reads_the_reason_without_the_other_tenant(stubs: Stubs, lab_c: Stubs) -> None:
    whole = await stubs.deployments.GetDeployment(D.GetDeploymentRequest(name="chat"))
    assert any("rack-00 holds lab-a" in r.message for r in whole.reasons)  # the admin's view

    mine = await lab_c.deployments.GetDeployment(D.GetDeploymentRequest(name="chat"))
    assert [r.code for r in mine.reasons] == [r.code for r in whole.reasons]
    assert any("rack-00 holds another tenant" in r.message for r in mine.reasons) and not _leaks(mine)

    listed = await lab_c.deployments.ListDeployments(D.ListDeploymentsRequest())
    assert listed.deployments and not _leaks(listed)

    watch = lab_c.deployments.WatchDeployments(D.WatchDeploymentsRequest(name="chat"))
    async for event in watch:
        assert event.deployment.reasons and not _leaks(event)
        break
    watch.cancel()

    events = await lab_c.admin.ListEvents(A.ListEventsRequest(object_kind="deployment", object_id="chat"))
    assert "deployment.unplaceable" in {e.kind for e in events.events} and not _leaks(events)
    admin_events = await stubs.admin.ListEvents(A.ListEventsRequest(object_kind="deployment", object_id="chat"))
    assert b"lab-a" in admin_events.SerializeToString()

    dry = await lab_c.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("chat-2", ""), dry_run=True))
    assert dry.deployment.reasons and not _leaks(dry)
