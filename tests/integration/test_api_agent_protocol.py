"""The agent protocol over real gRPC with a hand-driven agent: sets, reports, phases, delete."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from controller.retryinfo import told_retry_s
from controller.store.models import as_utc
from controller.store.tokens import get_token
from grpc_harness import (
    RUNNING, HandAgent, Stubs, admin_token_of, eventually, issue_token, running_controller, spec, topology,
)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


async def test_assignment_lifecycle_submit_running_delete_stopped(stubs: Stubs):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    agent = HandAgent(stubs, "node-1", "rack-a")
    reply = await agent.register()
    assert reply.node_id == "node-1" and reply.session_id and reply.heartbeat_interval_ms > 0
    await agent.connect()
    agent.keep_beating()  # the node stays ready under load (a silent stream ends after 2 s)
    first = await agent.next_set()
    assert list(first.assignments) == []  # the full (empty) set right after Hello
    node = await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                            lambda n: n.connected and n.state == common_pb2.NODE_STATE_READY, what="node ready")
    assert node.accelerators == 4

    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("svc", replicas=1, shards=2, accelerators=2, locality=common_pb2.DOMAIN_NODE)))
    assigned = await agent.next_set(lambda s: len(s.assignments) == 2)
    assert assigned.generation > first.generation
    indices = sorted(i for a in assigned.assignments for i in a.accelerator_indices)
    assert indices == [0, 1, 2, 3]
    assert {(a.deployment, a.tenant, a.shards_per_replica) for a in assigned.assignments} == {("svc", "lab", 2)}

    for a in assigned.assignments:
        agent.report(a, common_pb2.SHARD_PHASE_RUNNING)
    agent.beat_power_w = 1234.0  # its next heartbeats report a new draw
    running = await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
                               lambda d: d.phase == RUNNING, what="svc running")
    assert running.running_replicas == 1 and running.placed_replicas == 1
    assert {(p.node, tuple(p.accelerator_indices)) for p in running.placements} == {
        ("node-1", tuple(a.accelerator_indices)) for a in assigned.assignments}
    assert all(p.phase == common_pb2.SHARD_PHASE_RUNNING for p in running.placements)
    node = await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                            lambda n: n.power_draw_w == 1234.0, what="heartbeat written")
    assert node.accelerators_used == 4.0 and node.shards == 2 and list(node.tenants) == ["lab"]

    await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="svc"))
    emptied = await agent.next_set(lambda s: len(s.assignments) == 0)
    assert emptied.generation > assigned.generation  # the agent is told to stop the shards
    await eventually(lambda: stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest()),
                     lambda r: len(r.deployments) == 0, what="deployment row removed")
    node = await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1"))
    assert node.accelerators_used == 0.0 and node.shards == 0
    await agent.close()


async def test_hello_with_a_stale_session_is_refused(stubs: Stubs):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    agent = HandAgent(stubs, "node-1", "rack-a")
    await agent.register()
    old_session = agent.session_id
    await agent.register()  # a newer registration supersedes the first session
    await agent.connect(session_id=old_session)
    error = await agent.reader_error()
    assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == f"session {old_session} is not the current session of node node-1; register again"


async def test_closing_the_stream_marks_the_node_down(stubs: Stubs):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    agent = HandAgent(stubs, "node-1", "rack-a")
    await agent.register()
    await agent.connect()
    await agent.next_set()
    await agent.close()
    node = await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                            lambda n: n.state == common_pb2.NODE_STATE_DOWN, what="node down")
    assert not node.connected


async def test_silent_agent_is_marked_down_after_the_heartbeat_timeout(stubs: Stubs):
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    agent = HandAgent(stubs, "node-1", "rack-a")
    await agent.register()
    await agent.connect()
    await agent.next_set()
    # No heartbeats at all: the 2 s timeout of the test controller ends the stream.
    node = await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                            lambda n: n.state == common_pb2.NODE_STATE_DOWN, timeout=15, what="node down")
    assert not node.connected
    await agent.close()


REVOKED = (grpc.StatusCode.UNAUTHENTICATED, "the credential of node node-1 was revoked; register again")
DELETED = (grpc.StatusCode.NOT_FOUND, "node node-1 was deleted by an administrator and its node credential "
                                      "revoked: register it again with a node-bootstrap token")


@pytest.mark.parametrize("revocation, ended_with", [
    ("ResetNodeCredential", REVOKED), ("RevokeToken", REVOKED),
    ("DeleteNode", DELETED),  # the deleted node's stream ends as a deletion ends it, not as a revocation
])
async def test_a_revocation_ends_its_agents_stream_here_once_and_without_a_read(
        db_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch, revocation: str, ended_with) -> None:
    """The controller that serves a node credential's revocation ends the stream the credential
    opened as it commits, at once (not at the agent's next call): not a second time by the path
    that ends the streams of revocations heard from other controllers (`PeerMessages._end_streams`,
    a read of the nodes, which found the stream ended already)."""
    # The hand agent never heartbeats: a long timeout, so only the revocation can end its stream.
    async with running_controller(db_url, tmp_path, heartbeat_timeout_s=60) as app:
        heard_paths: list[object] = []
        end_streams = app.peers._end_streams

        def counted(token_ids):  # type: ignore[no-untyped-def]
            heard_paths.append(token_ids)
            return end_streams(token_ids)
        monkeypatch.setattr(app.peers, "_end_streams", counted)
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            credential = (await HandAgent(stubs, "node-1", "rack-a").register()).node_credential
            node = Stubs.connect(app.address, credential)  # the agent speaks with its own credential
            try:
                agent = HandAgent(node, "node-1", "rack-a")
                await agent.register()
                await agent.connect()
                await agent.next_set()
                if revocation == "ResetNodeCredential":
                    reset = await stubs.admin.ResetNodeCredential(admin_pb2.NodeRequest(id="node-1"))
                    assert len(reset.revoked_token_ids) == 1
                elif revocation == "RevokeToken":
                    token_id = credential.split(".")[0].removeprefix("maia_")
                    await stubs.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=token_id))
                else:
                    await stubs.admin.DeleteNode(admin_pb2.NodeRequest(id="node-1"))
                ended = await agent.reader_error()
                assert ended is not None and (ended.code(), ended.details()) == ended_with
                assert told_retry_s(ended.trailing_metadata()) is None  # not to be retried as it is
            finally:
                await node.channel.close()
            assert heard_paths == []  # scheduled as the revocation is signalled, if it is
        finally:
            await stubs.channel.close()


async def test_a_stream_opened_with_an_expiring_token_ends_unauthenticated_at_its_expiry_not_before(
        db_url: str, tmp_path) -> None:
    """A token is checked as a call starts, and a stream is one call: the stream an expiring token
    opened ends UNAUTHENTICATED when the token expires (a timer), not when its agent next calls."""
    # The hand agent never heartbeats: a long timeout, so only the expiry can end its stream.
    async with running_controller(db_url, tmp_path, heartbeat_timeout_s=60) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        expiring = await issue_token(app.db, "admin", name="short", ttl_s=4.0)
        token_id = expiring.split(".")[0].removeprefix("maia_")
        async with app.db.unit_of_work() as uow:
            expires_at = as_utc((await get_token(uow.session, token_id)).expires_at)
        node = Stubs.connect(app.address, expiring)  # speaks for the node until it expires
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            agent = HandAgent(node, "node-1", "rack-a")
            await agent.register()
            await agent.connect()
            await agent.next_set()
            ended = await agent.reader_error()
            ended_at = datetime.now(timezone.utc)
            assert ended is not None and ended.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ended.details() == (f"token {token_id}, which this stream was opened with, expired at "
                                       f"{expires_at.isoformat(timespec='seconds')}")
            assert ended_at >= expires_at
        finally:
            await node.channel.close()
            await stubs.channel.close()


async def test_a_node_shows_the_last_heartbeat_its_stream_brought_though_not_written_yet(db_url: str, tmp_path):
    """While a stream lives its heartbeats' times are written only every three timeouts (180 s
    here): GetNode shows the leader's own time of the last one."""
    async with running_controller(db_url, tmp_path, heartbeat_timeout_s=60) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            agent = HandAgent(stubs, "node-1", "rack-a")
            await agent.register()
            await agent.connect()
            await agent.next_set()
            agent.heartbeat(1, 700.0)  # a new power draw: written at once
            first = await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                                     lambda n: n.power_draw_w == 700.0, what="the first heartbeat written")
            await asyncio.sleep(1.5)
            agent.heartbeat(2, 700.0)  # only the time changed: not written
            later = await eventually(
                lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="node-1")),
                lambda n: n.last_heartbeat.ToDatetime() - first.last_heartbeat.ToDatetime() > timedelta(seconds=1),
                what="the second heartbeat's time shown")
            assert later.connected
            [listed] = (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())).nodes
            assert listed.last_heartbeat.ToDatetime() >= later.last_heartbeat.ToDatetime()
            await agent.close()
        finally:
            await stubs.channel.close()
