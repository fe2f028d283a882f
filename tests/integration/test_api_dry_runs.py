"""Dry runs asked in a call's metadata (`maia-dry-run: all`, controller/api/dryrun.py), over real
gRPC: answered as the write would be, refused as it would be, nothing written or audited; a
write without a dry run refuses the key rather than writing."""

from __future__ import annotations

import grpc
import pytest

from controller.api.dryrun import DRY_RUN_METADATA_KEY
from controller.api.server import ControllerApp
from controller.store import audit
from grpc_harness import Stubs, issue_token, spec, topology
from maia.v1 import admin_pb2, deployments_pb2

DRY = ((DRY_RUN_METADATA_KEY, "all"),)


async def _audited(app: ControllerApp) -> list[str]:
    async with app.db.unit_of_work() as uow:
        return [e.action for e in await audit.list_entries(uow.session, limit=1000) if e.action.startswith("/")]


async def test_dry_runs_answer_as_the_writes_and_write_nothing(controller_app: ControllerApp, stubs: Stubs) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    dep = (await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("chat")))).deployment
    audited = await _audited(controller_app)

    more = topology({"rack-a": "row-a", "rack-b": "row-b"})
    answer = await stubs.admin.ApplyTopology(more, metadata=DRY)
    assert sorted(k.id for k in answer.racks) == ["rack-a", "rack-b"]
    assert [k.id for k in (await stubs.admin.GetTopology(admin_pb2.GetTopologyRequest())).racks] == ["rack-a"]

    tenant = admin_pb2.Tenant(id="lab-2", excludes=["lab"], max_accelerators=8)
    assert (await stubs.admin.CreateTenant(tenant, metadata=DRY)).excludes == ["lab"]
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stubs.admin.GetTenant(admin_pb2.GetTenantRequest(id="lab-2"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # refused as the write: an unknown zone
        await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="lab", zones=["mars"]), metadata=DRY)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "unknown zone(s): mars" in refused.value.details()
    assert (await stubs.admin.UpdateTenant(admin_pb2.Tenant(id="lab", max_accelerators=3), metadata=DRY)
            ).max_accelerators == 3
    assert not (await stubs.admin.GetTenant(admin_pb2.GetTenantRequest(id="lab"))).HasField("max_accelerators")

    bigger = spec("chat", replicas=2)
    update = deployments_pb2.UpdateDeploymentRequest(spec=bigger, resource_version=dep.resource_version)
    dry = await stubs.deployments.UpdateDeployment(update, metadata=DRY)
    assert list(dry.changes) == ["replicas: 1 -> 2"] and dry.deployment.resource_version == dep.resource_version + 1
    stored = await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="chat", tenant="lab"))
    assert (stored.spec.replicas, stored.resource_version) == (1, dep.resource_version)
    assert await _audited(controller_app) == audited  # no entry for a dry run, answered or refused


async def test_a_write_without_a_dry_run_refuses_the_key(controller_app: ControllerApp, stubs: Stubs) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    for call, request, hint in [
        (stubs.admin.DeleteTenant, admin_pb2.DeleteTenantRequest(id="lab"), "DeleteTenant has no dry run"),
        (stubs.deployments.SubmitDeployment, deployments_pb2.SubmitDeploymentRequest(spec=spec("chat")),
         "set SubmitDeploymentRequest.dry_run"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request, metadata=DRY)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and hint in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-2"), metadata=((DRY_RUN_METADATA_KEY, "yes"),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'yes' is not 'all'" in refused.value.details()
    assert [t.id for t in (await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())).tenants] == ["lab"]
    assert (await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())).deployments == []
    # A read ignores it.
    assert (await stubs.admin.GetTenant(admin_pb2.GetTenantRequest(id="lab"), metadata=DRY)).id == "lab"


async def test_a_dry_run_needs_the_writes_rights(controller_app: ControllerApp, stubs: Stubs) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    tenant = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "tenant", tenant="lab"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tenant.admin.UpdateTenant(admin_pb2.Tenant(id="lab", max_accelerators=1000), metadata=DRY)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await tenant.channel.close()
