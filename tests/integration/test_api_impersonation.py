"""Node impersonation with real `maia-simnode` processes: a fleet holding only the node-bootstrap
token cannot take over registered nodes; one node's credential cannot speak for another; the
real agents reconnect after a restart with the credentials they kept; an admin reset lets a
node whose credential was lost register again."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from controller.api.server import ControllerApp
from controller.store import models as m
from controller.tokens import mint as mint_token
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2

NODES = ["rack-00-n00", "rack-00-n01"]


def _kept(log_dir: Path) -> dict[str, str]:
    [path] = (log_dir / "simnode-state").glob("credentials-*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    return json.loads(path.read_text())


async def _sessions(app: ControllerApp) -> dict[str, str | None]:
    async with app.db.unit_of_work() as uow:
        return dict((await uow.session.execute(select(m.Node.id, m.Node.session_id))).all())


async def _connected(stubs: Stubs) -> list[str]:
    nodes = (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())).nodes
    return sorted(n.id for n in nodes if n.connected and n.state == common_pb2.NODE_STATE_READY)


async def test_node_credentials_stop_impostors_and_survive_restarts(
        stubs: Stubs, controller_app: ControllerApp, tmp_path: Path) -> None:
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    bootstrap = await issue_token(controller_app.db, "node-bootstrap", name="fleet")
    real_dir, impostor_dir = tmp_path / "real", tmp_path / "impostor"
    real_dir.mkdir()
    impostor_dir.mkdir()
    fleets: list[SimFleet] = []

    def start(log_dir: Path) -> SimFleet:
        fleet = SimFleet(controller_app.address, racks=1, nodes_per_rack=2, token=bootstrap, log_dir=log_dir)
        fleets.append(fleet)
        return fleet

    try:
        real = start(real_dir)
        await eventually(lambda: _connected(stubs), lambda c: c == NODES, what="real agents connected")
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("svc", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
        before = await eventually(
            lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
            lambda d: d.phase == RUNNING, what="svc running")
        sessions = await _sessions(controller_app)
        credentials = _kept(real_dir)
        assert sorted(credentials) == NODES

        # Same node ids, same bootstrap token, no credentials: refused, nothing taken over.
        impostor = start(impostor_dir)
        await eventually(lambda: _log_count(impostor, "is already registered and holds a node credential"),
                         lambda n: n >= 2, what="both impostor registrations refused")
        await impostor.stop()
        assert "PERMISSION_DENIED" in impostor.log_tail() and " running" not in impostor.log_tail()
        assert await _sessions(controller_app) == sessions
        after = await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc"))
        assert after.phase == RUNNING and after.generation == before.generation
        assert await _connected(stubs) == NODES

        # One node's credential cannot register or connect as the other.
        n01 = Stubs.connect(controller_app.address, credentials["rack-00-n01"])
        try:
            info = agent_pb2.NodeInfo(node_id="rack-00-n00", rack="rack-00", accelerators=4,
                                      accelerator_model="maia-100")
            with pytest.raises(grpc.aio.AioRpcError) as register:
                await n01.agent.Register(agent_pb2.RegisterRequest(node=info))
            assert register.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "belongs to node rack-00-n01" in register.value.details()
            hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_id="rack-00-n00",
                                                                 session_id=sessions["rack-00-n00"]))
            with pytest.raises(grpc.aio.AioRpcError) as connect:
                async for _ in n01.agent.Connect(iter([hello])):
                    pass
            assert connect.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await n01.channel.close()
        assert await _sessions(controller_app) == sessions

        # A restarted fleet reconnects with the credentials it kept.
        await real.stop()
        real = start(real_dir)
        await eventually(lambda: _connected(stubs), lambda c: c == NODES, what="restarted agents reconnected")
        assert _kept(real_dir) == credentials

        # A lost credential: the admin resets it; the agent registers again and gets a new one.
        reset = await stubs.admin.ResetNodeCredential(admin_pb2.NodeRequest(id="rack-00-n00"))
        assert len(reset.revoked_token_ids) == 1
        await real.stop()
        real = start(real_dir)
        renewed = await eventually(_async(lambda: _kept(real_dir)),
                                   lambda k: k.get("rack-00-n00") not in (None, credentials["rack-00-n00"]),
                                   what="a new credential for the reset node")
        await eventually(lambda: _connected(stubs), lambda c: c == NODES, what="agents back after the reset")
        assert renewed["rack-00-n01"] == credentials["rack-00-n01"]
    finally:
        for fleet in fleets:
            await fleet.stop()


async def _log_count(fleet: SimFleet, text: str) -> int:
    return fleet.log_path.read_text(errors="replace").count(text)


def _async(read):  # type: ignore[no-untyped-def]
    async def probe():  # type: ignore[no-untyped-def]
        return read()
    return probe


async def test_an_agent_whose_register_reply_was_lost_registers_again_with_its_proposal(
        stubs: Stubs, controller_app: ControllerApp) -> None:
    """The node credential is the agent's own proposal: when the reply to the first Register is
    lost (the controller committed it, the agent never saw it), the same agent registers again
    with the bootstrap token; anyone else holding that token is still refused."""
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    bootstrap = Stubs.connect(controller_app.address, await issue_token(controller_app.db, "node-bootstrap"))
    info = agent_pb2.NodeInfo(node_id="rack-00-n00", rack="rack-00", accelerators=4, accelerator_model="maia-100")
    proposal, other = mint_token().text, mint_token().text
    try:
        first = await bootstrap.agent.Register(agent_pb2.RegisterRequest(node=info, credential_proposal=proposal))
        assert first.node_credential == ""  # the agent has it: the reply never carries it
        again = await bootstrap.agent.Register(agent_pb2.RegisterRequest(node=info, credential_proposal=proposal))
        assert again.node_credential == "" and again.session_id != first.session_id
        for request in (agent_pb2.RegisterRequest(node=info, credential_proposal=other),
                        agent_pb2.RegisterRequest(node=info)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bootstrap.agent.Register(request)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await bootstrap.agent.Register(agent_pb2.RegisterRequest(
                node=agent_pb2.NodeInfo(node_id="rack-00-n01", rack="rack-00", accelerators=4),
                credential_proposal="maia_0123456789abcdef.short"))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "credential_proposal" in malformed.value.details()
        tokens = (await stubs.admin.ListTokens(admin_pb2.ListTokensRequest(role="node"))).tokens
        assert [(t.id, t.node) for t in tokens if not t.revoked_at.seconds] == [(proposal[5:21], "rack-00-n00")]
        own = Stubs.connect(controller_app.address, proposal)  # the proposal is the node's credential
        try:
            await own.agent.Register(agent_pb2.RegisterRequest(node=info))
        finally:
            await own.channel.close()
    finally:
        await bootstrap.channel.close()


async def test_an_admin_registering_a_node_again_with_its_proposal_keeps_its_credential(
        stubs: Stubs, controller_app: ControllerApp) -> None:
    """Under --insecure-no-auth every caller is an admin: an agent whose first Register's reply was
    lost proposed the same credential again, an admin's Register issued a fresh one, which was that
    proposal again, and it was refused ("token id ... is taken") forever. The agent's own
    proposal again keeps its credential, as for a bootstrap token; another is a fresh one."""
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
    info = agent_pb2.NodeInfo(node_id="rack-00-n00", rack="rack-00", accelerators=4, accelerator_model="maia-100")
    proposal, other = mint_token().text, mint_token().text
    await stubs.agent.Register(agent_pb2.RegisterRequest(node=info, credential_proposal=proposal))
    again = await stubs.agent.Register(agent_pb2.RegisterRequest(node=info, credential_proposal=proposal))
    assert again.node_credential == ""
    active = [t.id for t in (await stubs.admin.ListTokens(admin_pb2.ListTokensRequest(role="node"))).tokens
              if not t.revoked_at.seconds]
    assert active == [proposal[5:21]]
    await stubs.agent.Register(agent_pb2.RegisterRequest(node=info, credential_proposal=other))  # an admin's reset
    active = [t.id for t in (await stubs.admin.ListTokens(admin_pb2.ListTokensRequest(role="node"))).tokens
              if not t.revoked_at.seconds]
    assert active == [other[5:21]]


async def test_a_node_bound_bootstrap_token_registers_its_node_only(stubs: Stubs, controller_app: ControllerApp) -> None:
    """A fleet-wide bootstrap token can claim any node id that holds no credential, one an admin
    just reset included (a race an exploratory test won 250 ms after a reset, taking the node's
    work). A token bound to one node (`CreateToken(node=...)`, `maiactl token create --node`)
    registers that node alone, before and after a reset."""
    await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))

    async def bound(node: str) -> Stubs:
        reply = await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role="node-bootstrap", node=node))
        assert (reply.token.role, reply.token.node) == ("node-bootstrap", node)
        return Stubs.connect(controller_app.address, reply.secret)

    def register(node: str) -> agent_pb2.RegisterRequest:
        return agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
            node_id=node, rack="rack-00", accelerators=4, accelerator_model="maia-100"))

    async def refused(client: Stubs, node: str) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.agent.Register(register(node))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        return error.value.details()

    n00, n01 = await bound("rack-00-n00"), await bound("rack-00-n01")
    try:
        assert await refused(n01, "rack-00-n00") == \
            "this node-bootstrap token registers node rack-00-n01 only, not rack-00-n00"
        assert await refused(n01, "rack-00-n99") == \
            "this node-bootstrap token registers node rack-00-n01 only, not rack-00-n99"
        assert (await n00.agent.Register(register("rack-00-n00"))).node_credential
        await stubs.admin.ResetNodeCredential(admin_pb2.NodeRequest(id="rack-00-n00"))
        # The reset's window: another host's token still cannot claim it; the node's own can.
        assert "registers node rack-00-n01 only" in await refused(n01, "rack-00-n00")
        assert (await n00.agent.Register(register("rack-00-n00"))).node_credential
        await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
        for role, tenant in (("admin", ""), ("tenant", "lab")):
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stubs.admin.CreateToken(admin_pb2.CreateTokenRequest(role=role, tenant=tenant, node="rack-00-n00"))
            assert (wrong.value.code(), wrong.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT, f"token: only role node-bootstrap takes a node (role is {role})")
    finally:
        await n00.channel.close()
        await n01.channel.close()
