"""Tenant-boundary leaks an exploratory security test found, over real gRPC (SQLite and
PostgreSQL): a tenant's ListTenants, the tokens of a deleted tenant, and whose audit log a
tenant's refused call is filed in."""

from __future__ import annotations

import json

import grpc
import pytest

from controller.api.server import ControllerApp
from controller.store import audit
from controller.usecases import paging
from grpc_harness import HandAgent, Stubs, issue_token, spec, topology
from google.protobuf.json_format import MessageToDict

from maia.v1 import admin_pb2, agent_pb2, audit_pb2, deployments_pb2

TENANTS = ("acme", "alpha", "bravo", "charlie", "delta", "zeta")


async def _world(app: ControllerApp, stubs: Stubs) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    for tenant in TENANTS:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant))


def _after(tenant_id: str) -> str:
    """A page token as a client could forge one: start after this id."""
    return paging.encode_token((tenant_id,), paging.scope_of("tenants"))


async def test_a_tenant_lists_its_own_contract_whatever_page_it_asks(controller_app: ControllerApp,
                                                                     stubs: Stubs) -> None:
    """Its row was filtered out of a page of every tenant: a page of 1 or 2 came back empty, and
    a forged page token ("after X") told it whether few tenants sorted between X and itself,
    enough to list every other tenant's name."""
    await _world(controller_app, stubs)
    delta = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="delta"))
    try:
        for size, token in [(1, ""), (2, ""), (100, ""), (1, _after("bravo")), (1, _after("delta")),
                            (1, _after("zzz"))]:
            listed = await delta.admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=size, page_token=token))
            assert ([t.id for t in listed.tenants], listed.next_page_token) == (["delta"], "")
    finally:
        await delta.channel.close()
    every = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=2))  # an admin still pages
    assert [t.id for t in every.tenants] == ["acme", "alpha"] and every.next_page_token


async def test_deleting_a_tenant_revokes_its_tokens(controller_app: ControllerApp, stubs: Stubs) -> None:
    """They stayed active: a tenant created later with the same id was served to them, its
    deployments listed and deleted by the former tenant's token."""
    await _world(controller_app, stubs)
    old = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="charlie"))
    try:
        assert [t.id for t in (await old.admin.ListTenants(admin_pb2.ListTenantsRequest())).tenants] == ["charlie"]
        await stubs.admin.DeleteTenant(admin_pb2.DeleteTenantRequest(id="charlie"))
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="charlie"))  # a new customer, the same id
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("newcustomer-secret", tenant="charlie")))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await old.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await old.channel.close()
    listed = await stubs.admin.ListTokens(admin_pb2.ListTokensRequest(tenant="charlie"))
    assert [bool(t.HasField("revoked_at")) for t in listed.tokens] == [True]


async def test_a_tenants_call_naming_another_tenant_is_filed_in_its_own_log(controller_app: ControllerApp,
                                                                             stubs: Stubs) -> None:
    """Refused calls naming another tenant were filed under that tenant: bravo could plant
    entries naming its token in alpha's log, and an admin reading bravo's found none of them."""
    await _world(controller_app, stubs)
    bravo = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="bravo",
                                                                     name="tok-bravo"))
    try:
        # One after the other (a call starts when made): their entries' order is the calls'.
        for call in (lambda: bravo.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(
                         name="x", tenant="alpha")),
                     lambda: bravo.admin.DeleteTenant(admin_pb2.DeleteTenantRequest(id="alpha"))):
            with pytest.raises(grpc.aio.AioRpcError):
                await call()
    finally:
        await bravo.channel.close()
    async with controller_app.db.unit_of_work() as uow:
        entries = [e for e in await audit.list_entries(uow.session, limit=1000) if e.actor == "tok-bravo"]
    assert [(e.action.rpartition("/")[2], e.tenant, e.outcome, e.detail.get("requested_tenant"))
            for e in entries] == [("DeleteDeployment", "bravo", "NOT_FOUND", "alpha"),
                                  ("DeleteTenant", "bravo", "PERMISSION_DENIED", "alpha")]


async def test_a_tenants_own_log_does_not_tell_which_tenant_ids_exist(controller_app: ControllerApp,
                                                                      stubs: Stubs) -> None:
    """The tenant a refused call named was redacted in the caller's log only when such a tenant
    existed: "tenant another tenant not found" for alpha, "tenant zzz not found" for a guess, so
    each guess tested whether a competitor is a customer. Both read the same now."""
    await _world(controller_app, stubs)
    bravo = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="bravo",
                                                                     name="tok-bravo"))
    try:
        for named in ("alpha", "zzz"):
            # One after the other (a call starts when made): alpha's two entries compare with zzz's in order.
            for call in (lambda: bravo.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(
                             name="x", tenant=named)),
                         lambda: bravo.admin.UpdateTenant(admin_pb2.Tenant(id=named))):
                with pytest.raises(grpc.aio.AioRpcError):
                    await call()
        listed = await bravo.audit.ListAuditEvents(audit_pb2.ListAuditEventsRequest())
    finally:
        await bravo.channel.close()
    seen = [(e.action.rpartition("/")[2], e.outcome, e.object_id, json.dumps(MessageToDict(e.detail), sort_keys=True))
            for e in listed.events if e.actor == "tok-bravo"]
    assert len(seen) == 4, seen
    assert seen[:2] == seen[2:], seen  # alpha (a tenant) and zzz (none) alike
    assert not any("alpha" in str(entry) or "zzz" in str(entry) for entry in seen), seen


async def test_a_tenant_token_is_refused_registering_nodes_before_anything_is_looked_up(
        controller_app: ControllerApp, stubs: Stubs) -> None:
    """Register judged the rack first: a tenant token learned which racks exist ('rack nope is not
    in the topology') and, from the refusal's words, which node ids are registered. It is refused
    for its role now, the same words whatever rack and node it names."""
    await _world(controller_app, stubs)
    await HandAgent(stubs, "known", "rack-a").register()
    alpha = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="alpha"))
    told = []
    try:
        for node_id, rack in (("known", "rack-a"), ("new", "rack-a"), ("new", "nope")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await alpha.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
                    node_id=node_id, hostname=node_id, rack=rack, accelerators=4)))
            told.append((refused.value.code(), refused.value.details()))
    finally:
        await alpha.channel.close()
    assert len(set(told)) == 1 and told[0][0] == grpc.StatusCode.PERMISSION_DENIED, told
