"""The authorization matrix over the whole API surface, on a real server (SQLite and PostgreSQL).

Every RPC that takes or returns a tenant's object, and every admin RPC, is called by callers
who may not do it: anonymous, an expired token, a revoked token, another tenant's token and a
node credential (of another node). Each call must fail with the stated status (NOT_FOUND for
another tenant's object, so its existence is never revealed; PERMISSION_DENIED for acting
outside a role; UNAUTHENTICATED without a valid token) and leave the database as it was. Lists
and summaries a rival tenant may call answer OK and must not mention the other tenant.

These calls are all refused, so the cases share one world (one controller) per backend, each
comparing the database after every call with a read taken just before the case's calls; a case
whose answer depends on the calls before it (`own_world`: the audit log a rival lists grows with
them) gets a world of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from sqlalchemy import select, update

from controller.api.server import ControllerApp
from controller.store import models as m
from grpc_harness import Stubs, admin_token_of, connect_answer, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, agent_pb2, audit_pb2, deployments_pb2

OWNER, RIVAL = "lab-alpha", "lab-beta"
C = grpc.StatusCode
DENIED, NOT_FOUND, OK, UNAUTH = C.PERMISSION_DENIED, C.NOT_FOUND, C.OK, C.UNAUTHENTICATED


@dataclass(frozen=True)
class Case:
    rpc: str
    call: Callable[[Stubs], Any]       # returns an awaitable (or a stream to read one message of)
    rival: grpc.StatusCode            # what the other tenant gets (OK: must not leak OWNER)
    node: grpc.StatusCode = DENIED    # what another node's credential gets
    own_world: bool = False           # its answer depends on the calls before it: not on the shared world


def _node(node_id: str) -> agent_pb2.NodeInfo:
    return agent_pb2.NodeInfo(node_id=node_id, hostname=node_id, rack="rack-a", accelerators=4,
                              accelerator_model="maia-100", hbm_gib=64, idle_power_w=500)


async def _hello_n1(stubs: Stubs) -> Any:
    code, answer = await connect_answer(stubs.agent, agent_pb2.Hello(node_id="n1", session_id="s"))
    if code != OK:
        raise answer
    return answer


async def _first(stream: Any) -> Any:
    async for message in stream:
        return message
    return None


D, A = deployments_pb2, admin_pb2
CASES = [
    Case("SubmitDeployment", lambda s: s.deployments.SubmitDeployment(
        D.SubmitDeploymentRequest(spec=spec("intruder", OWNER))), NOT_FOUND),
    Case("SubmitDeployment(dry_run)", lambda s: s.deployments.SubmitDeployment(
        D.SubmitDeploymentRequest(spec=spec("intruder", OWNER), dry_run=True)), NOT_FOUND),
    Case("UpdateDeployment", lambda s: s.deployments.UpdateDeployment(
        D.UpdateDeploymentRequest(spec=spec("chat", OWNER, replicas=2), resource_version=1)), NOT_FOUND),
    Case("UpdateDeployment(own tenant)", lambda s: s.deployments.UpdateDeployment(
        D.UpdateDeploymentRequest(spec=spec("chat", "", replicas=2), resource_version=1)), NOT_FOUND),
    Case("GetDeployment", lambda s: s.deployments.GetDeployment(D.GetDeploymentRequest(name="chat")), NOT_FOUND),
    Case("ListDeploymentRevisions", lambda s: s.deployments.ListDeploymentRevisions(
        D.ListDeploymentRevisionsRequest(name="chat", tenant=OWNER)), NOT_FOUND),
    Case("RollbackDeployment", lambda s: s.deployments.RollbackDeployment(
        D.RollbackDeploymentRequest(name="chat", to_revision=1)), NOT_FOUND),
    Case("RestartDeployment", lambda s: s.deployments.RestartDeployment(
        D.RestartDeploymentRequest(name="chat", tenant=OWNER)), NOT_FOUND),
    Case("ListDeployments(owner)", lambda s: s.deployments.ListDeployments(D.ListDeploymentsRequest(tenant=OWNER)),
         NOT_FOUND),
    Case("ListDeployments(all)", lambda s: s.deployments.ListDeployments(D.ListDeploymentsRequest()), OK),
    Case("DeleteDeployment", lambda s: s.deployments.DeleteDeployment(D.DeleteDeploymentRequest(name="chat")),
         NOT_FOUND),
    Case("WatchDeployments(owner)", lambda s: _first(s.deployments.WatchDeployments(
        D.WatchDeploymentsRequest(tenant=OWNER))), NOT_FOUND),
    Case("WatchDeployments(chat)", lambda s: _first(s.deployments.WatchDeployments(
        D.WatchDeploymentsRequest(name="chat"), timeout=1.5)), C.DEADLINE_EXCEEDED),
    Case("WatchDeploymentBatches(owner)", lambda s: _first(s.deployments.WatchDeploymentBatches(
        D.WatchDeploymentsRequest(tenant=OWNER))), NOT_FOUND),
    Case("WatchDeploymentBatches(chat)", lambda s: _first(s.deployments.WatchDeploymentBatches(
        D.WatchDeploymentsRequest(name="chat"), timeout=1.5)), C.DEADLINE_EXCEEDED),
    Case("GetUsage", lambda s: s.deployments.GetUsage(D.GetUsageRequest(tenant=OWNER)), NOT_FOUND),
    Case("CreateTenant", lambda s: s.admin.CreateTenant(A.Tenant(id="newcomer")), DENIED),
    Case("UpdateTenant", lambda s: s.admin.UpdateTenant(A.Tenant(id=OWNER, max_accelerators=1)), DENIED),
    Case("GetTenant", lambda s: s.admin.GetTenant(A.GetTenantRequest(id=OWNER)), NOT_FOUND),
    Case("ListTenants", lambda s: s.admin.ListTenants(A.ListTenantsRequest()), OK),
    Case("DeleteTenant", lambda s: s.admin.DeleteTenant(A.DeleteTenantRequest(id=OWNER)), DENIED),
    Case("ApplyTopology", lambda s: s.admin.ApplyTopology(topology({"rack-z": "row-z"})), DENIED),
    Case("GetTopology", lambda s: s.admin.GetTopology(A.GetTopologyRequest()), DENIED),
    Case("ListNodes", lambda s: s.admin.ListNodes(A.ListNodesRequest()), DENIED),
    Case("GetNode", lambda s: s.admin.GetNode(A.GetNodeRequest(id="n1")), DENIED),
    Case("CordonNode", lambda s: s.admin.CordonNode(A.NodeRequest(id="n1")), DENIED),
    Case("UncordonNode", lambda s: s.admin.UncordonNode(A.NodeRequest(id="n1")), DENIED),
    Case("DrainNode", lambda s: s.admin.DrainNode(A.NodeRequest(id="n1")), DENIED),
    Case("ResetNodeCredential", lambda s: s.admin.ResetNodeCredential(A.NodeRequest(id="n1")), DENIED),
    Case("GetClusterSummary", lambda s: s.admin.GetClusterSummary(A.GetClusterSummaryRequest()), OK),
    Case("GetClusterSnapshot", lambda s: s.admin.GetClusterSnapshot(A.GetClusterSnapshotRequest()), DENIED),
    Case("CreateToken", lambda s: s.admin.CreateToken(A.CreateTokenRequest(role="admin")), DENIED),
    Case("ListTokens", lambda s: s.admin.ListTokens(A.ListTokensRequest()), DENIED),
    Case("RevokeToken", lambda s: s.admin.RevokeToken(A.RevokeTokenRequest(id="0123456789abcdef")), DENIED),
    # Another tenant's audit entries are NOT_FOUND, as its deployments and usage are (a tenant
    # token was answered with its own entries, as if they were the other's).
    Case("ListAuditEvents(owner)", lambda s: s.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest(tenant=OWNER)),
         NOT_FOUND),
    # Naming none, a tenant token lists its own tenant's entries: nothing of the owner's in them.
    Case("ListAuditEvents(own)", lambda s: s.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest()),
         OK, own_world=True),
    Case("ListEvents(chat)", lambda s: s.admin.ListEvents(A.ListEventsRequest(object_kind="deployment",
                                                                             object_id="chat")), NOT_FOUND),
    Case("ListEvents(owner)", lambda s: s.admin.ListEvents(A.ListEventsRequest(object_kind="tenant",
                                                                              object_id=OWNER)), NOT_FOUND),
    Case("ListEvents(all)", lambda s: s.admin.ListEvents(A.ListEventsRequest()), DENIED),
    Case("VerifyAuditLog", lambda s: s.audit.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest()), DENIED),
    # A tenant reads the release (`maiactl version`); a node's credential may Register and Connect alone.
    Case("GetVersion", lambda s: s.admin.GetVersion(A.GetVersionRequest()), OK),
    Case("Register(n1)", lambda s: s.agent.Register(agent_pb2.RegisterRequest(node=_node("n1"))), DENIED),
    Case("Connect(n1)", _hello_n1, DENIED),
]


async def _fingerprint(app: ControllerApp) -> tuple:
    """Everything a refused call could have changed (the audit trail aside, which records it)."""
    async with app.db.unit_of_work() as uow:
        s = uow.session
        return (
            (await s.execute(select(m.Deployment.tenant_id, m.Deployment.name, m.Deployment.phase,
                                    m.Deployment.generation, m.Deployment.resource_version,
                                    m.Deployment.replicas).order_by(m.Deployment.id))).all(),
            (await s.execute(select(m.ClientRequest.tenant_id, m.ClientRequest.request_id))).all(),
            (await s.execute(select(m.Tenant.id, m.Tenant.max_accelerators).order_by(m.Tenant.id))).all(),
            (await s.execute(select(m.Node.id, m.Node.cordoned, m.Node.session_id).order_by(m.Node.id))).all(),
            (await s.execute(select(m.Rack.id).order_by(m.Rack.id))).all(),
            (await s.execute(select(m.ApiToken.id, m.ApiToken.revoked_at).order_by(m.ApiToken.id))).all(),
            (await s.execute(select(m.ClusterState.generation))).all(),
        )


@dataclass(frozen=True)
class World:
    app: ControllerApp
    callers: dict[str, Stubs]  # who -> stubs carrying their token


async def _world(app: ControllerApp, stubs: Stubs) -> World:
    """OWNER with deployment chat, RIVAL, nodes n1 and n2, and the callers that must be refused."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    for tenant in (OWNER, RIVAL):
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("chat", OWNER)))
    await stubs.agent.Register(agent_pb2.RegisterRequest(node=_node("n1")))
    n2 = await stubs.agent.Register(agent_pb2.RegisterRequest(node=_node("n2")))
    db = app.db
    expired = await issue_token(db, "tenant", tenant=OWNER, name="expired", ttl_s=3600)
    async with db.unit_of_work() as uow:
        await uow.session.execute(update(m.ApiToken).where(m.ApiToken.name == "expired")
                                  .values(expires_at=datetime.now(timezone.utc) - timedelta(minutes=1)))
        await uow.commit()
    revoked = await issue_token(db, "tenant", tenant=OWNER, name="revoked")
    await stubs.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=revoked.split(".")[0].removeprefix("maia_")))
    callers = {"anonymous": None, "expired": expired, "revoked": revoked,
               "rival": await issue_token(db, "tenant", tenant=RIVAL, name="rival"),
               "node": n2.node_credential}
    return World(app, {who: Stubs.connect(app.address, token) for who, token in callers.items()})


async def _close(world: World) -> None:
    for caller in world.callers.values():
        await caller.channel.close()


@pytest.fixture
async def world(controller_app: ControllerApp, stubs: Stubs) -> AsyncIterator[World]:
    """`_world` on the test's own controller."""
    made = await _world(controller_app, stubs)
    yield made
    await _close(made)


@pytest.fixture(scope="module")
async def shared_world(shared_controller: ControllerApp) -> AsyncIterator[World]:
    """`_world` on the module's controller (one per backend), for the cases that are not `own_world`."""
    stubs = Stubs.connect(shared_controller.address, admin_token_of(shared_controller))
    try:
        made = await _world(shared_controller, stubs)
        yield made
        await _close(made)
    finally:
        await stubs.channel.close()


async def _status(call: Callable[[Stubs], Any], stubs: Stubs) -> tuple[grpc.StatusCode, Any]:
    try:
        return OK, await call(stubs)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), None


async def _refused_by_all_and_nothing_changed(world: World, case: Case) -> None:
    expected = {"anonymous": UNAUTH, "expired": UNAUTH, "revoked": UNAUTH, "rival": case.rival, "node": case.node}
    before = await _fingerprint(world.app)
    got = {}
    for who, stubs in world.callers.items():
        code, reply = await _status(case.call, stubs)
        got[who] = code
        if code == OK:  # a rival's own view: nothing of the other tenant in it
            assert OWNER.encode() not in reply.SerializeToString(), (case.rpc, who, reply)
        assert await _fingerprint(world.app) == before, f"{case.rpc} by {who} changed the database"
    assert got == expected


SHARED_CASES = [c for c in CASES if not c.own_world]
OWN_WORLD_CASES = [c for c in CASES if c.own_world]


@pytest.mark.parametrize("case", SHARED_CASES, ids=[c.rpc for c in SHARED_CASES])
async def test_callers_without_the_right_get_the_stated_status_and_change_nothing(
        shared_world: World, case: Case) -> None:
    await _refused_by_all_and_nothing_changed(shared_world, case)


@pytest.mark.parametrize("case", OWN_WORLD_CASES, ids=[c.rpc for c in OWN_WORLD_CASES])
async def test_callers_without_the_right_get_the_stated_status_and_change_nothing_on_a_world_of_their_own(
        world: World, case: Case) -> None:
    await _refused_by_all_and_nothing_changed(world, case)


async def test_the_owner_and_an_admin_do_what_the_others_may_not(
        controller_app: ControllerApp, stubs: Stubs, world: World) -> None:
    owner = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant=OWNER))
    try:
        assert (await owner.deployments.GetDeployment(D.GetDeploymentRequest(name="chat"))).spec.tenant == OWNER
        listed = await owner.deployments.ListDeployments(D.ListDeploymentsRequest())
        assert [d.spec.name for d in listed.deployments] == ["chat"]
        assert [t.id for t in (await owner.admin.ListTenants(A.ListTenantsRequest())).tenants] == [OWNER]
        summary = await owner.admin.GetClusterSummary(A.GetClusterSummaryRequest())
        assert [t.id for t in summary.tenants] == [OWNER] and summary.accelerators_total == 0
        # A tenant submits into its own tenant when it names none.
        submitted = await owner.deployments.SubmitDeployment(D.SubmitDeploymentRequest(spec=spec("mine", "")))
        assert submitted.deployment.spec.tenant == OWNER
        # ... and updates its own deployment in place.
        chat = await owner.deployments.GetDeployment(D.GetDeploymentRequest(name="chat"))
        scaled = await owner.deployments.UpdateDeployment(D.UpdateDeploymentRequest(
            spec=spec("chat", "", replicas=2), resource_version=chat.resource_version))
        assert list(scaled.changes) == ["replicas: 1 -> 2"] and scaled.deployment.resource_version == 2
        # ... rolls it to a new template, reads its revisions and rolls it back.
        bigger = spec("chat", "", replicas=2)
        bigger.shard.hbm_gib = 24
        await owner.deployments.UpdateDeployment(D.UpdateDeploymentRequest(spec=bigger, resource_version=2))
        history = await owner.deployments.ListDeploymentRevisions(D.ListDeploymentRevisionsRequest(name="chat"))
        assert [(r.revision, r.spec.tenant) for r in history.revisions] == [(2, OWNER), (1, OWNER)]
        back = await owner.deployments.RollbackDeployment(D.RollbackDeploymentRequest(name="chat"))
        assert back.to_revision == 1 and list(back.changes) == ["shard.hbm_gib: 24 -> 16"]
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await owner.admin.UpdateTenant(A.Tenant(id=OWNER, max_accelerators=1000))
        assert denied.value.code() == DENIED and "admin" in denied.value.details()
        await owner.deployments.DeleteDeployment(D.DeleteDeploymentRequest(name="chat"))
        await eventually(lambda: owner.deployments.ListDeployments(D.ListDeploymentsRequest()),
                         lambda r: [d.spec.name for d in r.deployments] == ["mine"], what="chat deleted")
    finally:
        await owner.channel.close()
    assert [t.id for t in (await stubs.admin.ListTenants(A.ListTenantsRequest())).tenants] == [OWNER, RIVAL]
