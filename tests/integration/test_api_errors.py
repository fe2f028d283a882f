"""Bad input over gRPC: the precise status code and message, and nothing written.

Every call here is refused, so the tests share one seeded controller per backend
(`shared_seeded`, tests/integration/conftest.py), each comparing the state after its call with
a read taken just before it."""

from __future__ import annotations

import grpc
import pytest

from controller.api.server import ControllerApp
from grpc_harness import Stubs, api_state, spec, written_state
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2


def _submit(msg: deployments_pb2.DeploymentSpec, dry_run: bool = False):
    return lambda s: s.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=msg, dry_run=dry_run))


CASES = [
    ("bad name", _submit(spec("Not_OK")), grpc.StatusCode.INVALID_ARGUMENT,
     "deployment name 'Not_OK' is invalid: use lowercase letters, digits and '-', starting and ending with a letter or digit"),
    ("zero replicas", _submit(spec("svc", replicas=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "deployment svc: replicas must be between 1 and 4096, got 0"),
    ("fraction of two", _submit(deployments_pb2.DeploymentSpec(
        name="svc", tenant="lab", replicas=1, shards_per_replica=1,
        shard=common_pb2.ShardSpec(accelerators=2, accelerator_milli=250))), grpc.StatusCode.INVALID_ARGUMENT,
     "deployment svc: shard.accelerator_milli 250 (a fraction) needs shard.accelerators = 1, got 2"),
    ("gang bigger than any rack", _submit(spec("svc", shards=2, accelerators=4)), grpc.StatusCode.INVALID_ARGUMENT,
     "deployment svc: one rack-local replica needs 8 accelerators (2 shards x 4); the largest rack holds 4 (rack-a)"),
    ("unknown model", _submit(spec("svc", models=("h100",))), grpc.StatusCode.INVALID_ARGUMENT,
     "deployment svc: no node has accelerator model h100 (registered models: maia-100)"),
    ("unknown tenant", _submit(spec("svc", tenant="ghost")), grpc.StatusCode.NOT_FOUND, "tenant ghost not found"),
    ("duplicate", _submit(spec("existing")), grpc.StatusCode.ALREADY_EXISTS, "deployment existing already exists in tenant lab"),
    ("duplicate dry run", _submit(spec("existing"), dry_run=True), grpc.StatusCode.ALREADY_EXISTS,
     "deployment existing already exists in tenant lab"),
    ("get missing", lambda s: s.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="nope")),
     grpc.StatusCode.NOT_FOUND, "deployment nope not found"),
    ("delete missing", lambda s: s.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="nope")),
     grpc.StatusCode.NOT_FOUND, "deployment nope not found"),
    ("tenant exists", lambda s: s.admin.CreateTenant(admin_pb2.Tenant(id="lab")), grpc.StatusCode.ALREADY_EXISTS,
     "tenant lab already exists"),
    ("tenant excludes ghost", lambda s: s.admin.CreateTenant(admin_pb2.Tenant(id="lab2", excludes=["ghost"])),
     grpc.StatusCode.NOT_FOUND, "tenant lab2 excludes unknown tenant(s): ghost"),
    ("tenant negative cap", lambda s: s.admin.CreateTenant(admin_pb2.Tenant(id="lab2", max_accelerators=-2)),
     grpc.StatusCode.INVALID_ARGUMENT, "tenant lab2: max_accelerators must be >= 0, got -2"),
    ("tenant with deployments", lambda s: s.admin.DeleteTenant(admin_pb2.DeleteTenantRequest(id="lab")),
     grpc.StatusCode.FAILED_PRECONDITION, "tenant lab has 1 deployment(s); delete them first"),
    ("topology unknown zone", lambda s: s.admin.ApplyTopology(admin_pb2.Topology(rows=[admin_pb2.Row(id="r9", zone="zz")])),
     grpc.StatusCode.NOT_FOUND, "unknown zone(s) zz (row r9 -> zone zz); add them to the topology"),
    ("topology negative budget", lambda s: s.admin.ApplyTopology(admin_pb2.Topology(
        racks=[admin_pb2.Rack(id="rack-b", row="row-a", power_budget_w=-1)])),
     grpc.StatusCode.INVALID_ARGUMENT, "rack rack-b: power_budget_w must be >= 0, got -1"),
    ("register unknown rack", lambda s: s.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
        node_id="n9", rack="rack-07", accelerators=4))),
     grpc.StatusCode.FAILED_PRECONDITION, "rack rack-07 is not in the topology; apply it first"),
    ("cordon unknown node", lambda s: s.admin.CordonNode(admin_pb2.NodeRequest(id="n404")),
     grpc.StatusCode.NOT_FOUND, "node n404 not found"),
]


@pytest.mark.parametrize(("call", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_refused_with_code_and_message_and_nothing_written(shared_seeded: Stubs, call, code, message):
    before = await api_state(shared_seeded)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(shared_seeded)
    assert info.value.code() == code
    assert info.value.details() == message
    assert await api_state(shared_seeded) == before


async def test_connect_must_start_with_hello(shared_seeded: Stubs):
    async def messages():
        yield agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1))

    call = shared_seeded.agent.Connect(messages())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "the first message on Connect must be Hello (node_id, session_id)"


async def test_impossible_request_carries_a_structured_reason(shared_seeded: Stubs):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shared_seeded.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("svc", shards=2, accelerators=4)))
    reasons = [common_pb2.Reason.FromString(value) for key, value in info.value.trailing_metadata()
               if key == "maia-reason-bin"]
    assert [(r.code, r.scope) for r in reasons] == [("LOCALITY", "rack-a")]
    assert reasons[0].message == info.value.details()


async def test_what_a_shared_controller_must_keep_sees_a_token_and_a_cordon(controller_app: ControllerApp,
                                                                            seeded: Stubs) -> None:
    """`shared_seeded`'s teardown fails a test that wrote: a token issued and a node cordoned are
    writes too (a refused CreateToken or CordonNode that wrote would otherwise pass unseen, and
    leave its write to the tests after it). Its own controller: this one writes."""
    before = await written_state(controller_app, seeded)
    await seeded.admin.CreateToken(admin_pb2.CreateTokenRequest(role="tenant", tenant="lab", name="written"))
    issued = await written_state(controller_app, seeded)
    assert issued != before
    await seeded.admin.CordonNode(admin_pb2.NodeRequest(id="n1"))
    assert await written_state(controller_app, seeded) != issued
