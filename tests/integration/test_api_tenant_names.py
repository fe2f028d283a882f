"""Deployment names are per tenant, end to end: two tenants both run a deployment `chat` on real
simulated nodes (`maia-simnode`), and nothing one does by name touches or reveals the other's.

Get, delete, watch and events of one tenant's `chat` never see the other's; a tenant's
ALREADY_EXISTS comes only from its own names; an admin names the tenant (without one, a name
two tenants use is FAILED_PRECONDITION naming them; a name only one uses is resolved).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.api.server import ControllerApp
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

D, A = deployments_pb2, admin_pb2
LAB_A, LAB_B = "lab-a", "lab-b"


async def _get(stubs: Stubs, name: str, tenant: str = "") -> D.Deployment:
    return await stubs.deployments.GetDeployment(D.GetDeploymentRequest(name=name, tenant=tenant))


async def _code(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.fixture
async def labs(controller_app: ControllerApp, stubs: Stubs, tmp_path: Path) -> AsyncIterator[dict[str, Stubs]]:
    """Two tenants sharing one rack of two simulated nodes, each with a token of its own and
    both running `chat` (lab-a also runs `only-a`)."""
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    for tenant in (LAB_A, LAB_B):
        await stubs.admin.CreateTenant(A.Tenant(id=tenant))
    fleet = SimFleet(controller_app.address, racks=1, nodes_per_rack=2, log_dir=tmp_path,
                     token=await issue_token(controller_app.db, "node-bootstrap"))
    opened = {t: Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant=t))
              for t in (LAB_A, LAB_B)}
    try:
        await eventually(lambda: stubs.admin.ListNodes(A.ListNodesRequest()),
                         lambda r: sum(n.connected and n.state == common_pb2.NODE_STATE_READY for n in r.nodes) == 2,
                         what="2 agents connected")
        for tenant, lab in opened.items():
            # A replica of each `chat` on each node: the same name twice on one node.
            await lab.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec(
                "chat", "", replicas=2, locality=common_pb2.DOMAIN_NODE,
                spread=common_pb2.Spread(domain=common_pb2.DOMAIN_NODE, max_per_domain=1))))
        await opened[LAB_A].deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("only-a", "")))
        for tenant in (LAB_A, LAB_B):
            await eventually(lambda: _get(stubs, "chat", tenant), lambda d: d.phase == RUNNING, timeout=60,
                             what=f"{tenant}'s chat running")
        yield opened
    finally:
        for lab in opened.values():
            await lab.channel.close()
        await fleet.stop()


async def test_two_tenants_run_the_same_name_and_each_sees_only_its_own(stubs: Stubs, labs: dict[str, Stubs]) -> None:
    a, b = labs[LAB_A], labs[LAB_B]
    mine, theirs = await _get(a, "chat"), await _get(b, "chat")
    assert (mine.spec.tenant, theirs.spec.tenant) == (LAB_A, LAB_B)
    assert mine.running_replicas == theirs.running_replicas == 2
    # Both run on the two nodes: a node holds `chat` of both tenants, each reported on its own.
    assert {p.node for p in mine.placements} == {p.node for p in theirs.placements}

    # Admins name the tenant; a name two tenants use is ambiguous, one only lab-a uses is not.
    ambiguous = await _code(_get(stubs, "chat"))
    assert ambiguous.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert LAB_A in ambiguous.details() and LAB_B in ambiguous.details() and "tenant" in ambiguous.details()
    assert (await _get(stubs, "chat", LAB_B)).spec.tenant == LAB_B
    assert (await _get(stubs, "only-a")).spec.tenant == LAB_A
    # A tenant naming another tenant is NOT_FOUND, like a name it does not have.
    assert (await _code(_get(b, "chat", LAB_A))).code() == grpc.StatusCode.NOT_FOUND
    assert (await _code(_get(b, "only-a"))).code() == grpc.StatusCode.NOT_FOUND

    # Usage: one record per tenant's `chat`, each tenant reading only its own (before
    # lab-b submits a second deployment below, which the reconciler may place at once).
    usage = await b.deployments.GetUsage(D.GetUsageRequest())
    assert {(r.tenant, r.deployment) for r in usage.records} == {(LAB_B, "chat")}

    # ALREADY_EXISTS only from one's own names: lab-b may take lab-a's `only-a`, not its own `chat`.
    again = await _code(b.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("chat", ""))))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS and LAB_A not in again.details()
    taken = await b.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("only-a", "")))
    assert taken.deployment.spec.tenant == LAB_B

    # Events: each tenant's history of `chat` is its own (the history names it TENANT/NAME).
    for lab, tenant in ((a, LAB_A), (b, LAB_B)):
        history = await lab.admin.ListEvents(A.ListEventsRequest(object_kind="deployment", object_id="chat"))
        assert history.events and {e.object_id for e in history.events} == {f"{tenant}/chat"}
        assert {e.kind for e in history.events} >= {"deployment.submitted", "deployment.placed"}
    other = await _code(b.admin.ListEvents(A.ListEventsRequest(object_kind="deployment", object_id="lab-a/chat")))
    assert other.code() == grpc.StatusCode.NOT_FOUND
    by_admin = await stubs.admin.ListEvents(A.ListEventsRequest(object_kind="deployment", object_id="chat",
                                                                tenant=LAB_B))
    assert {e.object_id for e in by_admin.events} == {"lab-b/chat"}


async def test_deleting_one_tenants_chat_leaves_the_others_alone(stubs: Stubs, labs: dict[str, Stubs]) -> None:
    a, b = labs[LAB_A], labs[LAB_B]
    before = await _get(a, "chat")
    watch = a.deployments.WatchDeployments(D.WatchDeploymentsRequest())  # everything lab-a may see

    deleted = await b.deployments.DeleteDeployment(D.DeleteDeploymentRequest(name="chat"))
    assert deleted.spec.tenant == LAB_B and deleted.phase == D.DEPLOYMENT_PHASE_DELETING
    await eventually(lambda: b.deployments.ListDeployments(D.ListDeploymentsRequest()),
                     lambda r: not r.deployments, what="lab-b's chat gone")
    after = await _get(a, "chat")
    assert after.phase == RUNNING and after.generation == before.generation
    assert [(p.node, tuple(p.accelerator_indices)) for p in after.placements] == \
        [(p.node, tuple(p.accelerator_indices)) for p in before.placements]
    assert (await _code(_get(stubs, "chat", LAB_B))).code() == grpc.StatusCode.NOT_FOUND
    assert (await _get(stubs, "chat")).spec.tenant == LAB_A  # the only `chat` left: no tenant needed

    # lab-a's watch saw its own deployments only: end it with a change of its own and read up to it.
    await a.deployments.DeleteDeployment(D.DeleteDeploymentRequest(name="only-a"))
    seen = []
    async for event in watch:
        seen.append((event.type, event.deployment.spec.tenant, event.deployment.spec.name))
        if event.type == D.DeploymentEvent.TYPE_DELETED and event.deployment.spec.name == "only-a":
            break
    watch.cancel()
    assert {tenant for _, tenant, _ in seen} == {LAB_A}
    assert (D.DeploymentEvent.TYPE_ADDED, LAB_A, "chat") in seen
