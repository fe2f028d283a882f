"""Agents through a gateway process (`--agent-gateways`): real gateway processes, real sockets.

The controller runs in process (its gateways are its child processes, as `maia-controller` starts
them); agents are `HandAgent`s and a `maia-simnode` fleet connecting to the gateways' address."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import limits
from controller.api.server import ControllerApp
from controller.gateway import children
from controller.gateway.frames import GATEWAY_METADATA_KEY, LINK_OPTIONS
from controller.gateway.relay import RELAY_WINDOW, RelayedRequests
from controller.retryinfo import controller_answered
from grpc_harness import (
    RUNNING, HandAgent, SimFleet, Stubs, admin_token_of, connect_answer, eventually, issue_token, running_controller,
    spec, topology,
)
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2, relay_pb2, relay_pb2_grpc

READY = common_pb2.NODE_STATE_READY
SUSPECT = common_pb2.NODE_STATE_SUSPECT
SCHEDULED = deployments_pb2.DEPLOYMENT_PHASE_SCHEDULED


@asynccontextmanager
async def gatewayed(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[ControllerApp, Stubs]]:
    """A controller serving agents through one gateway, rack rack-a and tenant lab; admin stubs."""
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path, agent_gateways=1,
                                  agent_listen="127.0.0.1:0", **overrides) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-00": "row-a", "rack-a": "row-a"}))
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
            yield app, stubs
        finally:
            await stubs.channel.close()


@asynccontextmanager
async def fleet_through_gateway(app: ControllerApp, stubs: Stubs, tmp_path: Path, nodes: int) -> AsyncIterator[SimFleet]:
    """A `maia-simnode` fleet of `nodes` on rack-00 connected through the gateways, every node ready."""
    bootstrap = await issue_token(app.db, "node-bootstrap", name="fleet")
    fleet = SimFleet(app.agent_address, racks=1, nodes_per_rack=nodes, token=bootstrap, log_dir=tmp_path)
    try:
        await ready_nodes(stubs, nodes, "agents connected through the gateway")
        yield fleet
    finally:
        await fleet.stop()


async def ready_nodes(stubs: Stubs, count: int, what: str) -> None:
    await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                     lambda r: sum(n.connected and n.state == READY for n in r.nodes) == count, what=what)


async def node(stubs: Stubs, node_id: str) -> Any:
    nodes = await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())
    return next((n for n in nodes.nodes if n.id == node_id), None)


async def test_an_agent_through_a_gateway_registers_runs_its_shard_and_stays_up(tmp_path: Path) -> None:
    async with gatewayed(tmp_path) as (app, stubs):
        assert app.agent_address and app.agent_address != app.address
        bootstrap = await issue_token(app.db, "node-bootstrap", name="fleet")
        joining = Stubs.connect(app.agent_address, bootstrap)
        agent = HandAgent(joining, "n1", "rack-a")
        registered = await agent.register()
        assert registered.node_credential and registered.heartbeat_interval_ms > 0
        agent.stubs = Stubs.connect(app.agent_address, registered.node_credential)
        try:
            await agent.connect()
            assert not (await agent.next_set()).assignments  # the full (empty) set as the stream opens
            agent.keep_beating(every_s=0.3)
            [link] = app.relay.links.values()
            assert link.open_calls() == 1  # the stream is relayed, not served on --listen
            await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("d1")))
            given = await agent.next_set(lambda s: len(s.assignments) == 1)
            agent.report(given.assignments[0], common_pb2.SHARD_PHASE_RUNNING)
            await eventually(lambda: stubs.deployments.GetDeployment(
                deployments_pb2.GetDeploymentRequest(name="d1", tenant="lab")), lambda d: d.phase == RUNNING,
                what="d1 running")
            # Past two heartbeat timeouts (2 s each) the relayed heartbeats still keep the node up.
            for _ in range(3):
                await asyncio.sleep(1.5)
                n1 = await node(stubs, "n1")
                assert n1.connected and n1.state == READY
        finally:
            await agent.close()
            await joining.channel.close()
            await agent.stubs.channel.close()


async def test_a_relayed_streams_messages_are_taken_as_its_frames_arrive_and_a_bad_one_ends_it(tmp_path: Path) -> None:
    """The hub takes a relayed stream's messages in the call that delivers each frame (no reader
    task woken a message), and a message it refuses ends the stream as on the port."""
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        credential = (await HandAgent(stubs, "n1", "rack-a").register()).node_credential
        agent = HandAgent(Stubs.connect(app.agent_address, credential), "n1", "rack-a")
        try:
            await agent.register()
            await agent.connect()
            await agent.next_set()
            assert app.hub.heard_from("n1") is None
            agent.heartbeat(1, 640.0)
            await eventually(lambda: _async(app.hub.heard_from("n1")), lambda heard: heard is not None,
                             what="the relayed heartbeat taken")
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("agent-read-")]
            agent.heartbeat(2, 1e12)  # past limits.POWER_W_MAX: refused
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(agent._reader, 20)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "power_draw_w" in refused.value.details()
        finally:
            await agent.close()
            await agent.stubs.channel.close()


async def test_a_relayed_stream_whose_agent_sends_faster_than_it_is_read_ends_resource_exhausted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the port HTTP/2's flow control holds back an agent that writes while its Hello waits its
    turn; a relayed stream's requests have no window, and one agent queued 67 MiB in the
    controller in 2 s (found in review). Past `limits.RELAYED_UNREAD_BYTES_MAX` unread the stream
    ends RESOURCE_EXHAUSTED and what it queued is dropped."""
    monkeypatch.setattr(limits, "RELAYED_UNREAD_BYTES_MAX", 1 << 20)
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        registered = await HandAgent(stubs, "n1", "rack-a").register()
        hello = app.hub._hello

        async def waits_its_turn(*args: Any) -> Any:  # a Hello behind a join storm's
            await asyncio.sleep(30.0)
            return await hello(*args)

        monkeypatch.setattr(app.hub, "_hello", waits_its_turn)
        peak = [0]
        put = RelayedRequests.put

        def counted(self: RelayedRequests, data: bytes) -> None:
            put(self, data)
            peak[0] = max(peak[0], self.arrivals.waiting_bytes)

        monkeypatch.setattr(RelayedRequests, "put", counted)
        channel = grpc.aio.insecure_channel(app.agent_address)
        try:
            call = channel.stream_stream("/maia.v1.NodeAgentService/Connect")(
                metadata=(("authorization", f"Bearer {registered.node_credential}"),))
            await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(
                node_id="n1", session_id=registered.session_id)).SerializeToString())
            beat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1, shards=[
                agent_pb2.ShardStatus(deployment="x" * 1000, replica=i) for i in range(16)])).SerializeToString()
            # Just past the bound, and no write after (one the status overtakes fails in the
            # client's own gRPC core, whose status is then INTERNAL, not the controller's).
            for _ in range((1 << 20) // len(beat) + 1):
                await asyncio.wait_for(call.write(beat), 10)
            code = await asyncio.wait_for(call.code(), 20)  # the Hello waits 30 s: not its end
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, await call.details()
            assert "before the controller read its stream" in await call.details()
            assert peak[0] <= (1 << 20) + len(beat) + 16
            [link] = app.relay.links.values()
            await eventually(lambda: _async(link.open_calls()), lambda calls: calls == 0, what="the call forgotten")
        finally:
            await channel.close()


async def test_a_gateway_that_dies_ends_its_streams_and_the_nodes_are_suspect_at_once(tmp_path: Path) -> None:
    # A heartbeat timeout of a minute: within the test's wait only a stream that ended makes a node suspect.
    # Not started again within the test: the nodes stay suspect.
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0, node_down_grace_s=60.0,
                         node_eviction_grace_s=120.0, agent_gateway_restart_s=600.0) as (app, stubs):
        async with fleet_through_gateway(app, stubs, tmp_path, 3) as fleet:
            [gateway] = app.gateways.processes
            gateway.send_signal(signal.SIGKILL)
            nodes = await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                                     lambda r: all(not n.connected and n.state == SUSPECT for n in r.nodes),
                                     timeout=20, what="every node suspect after its gateway died")
            assert {n.id for n in nodes.nodes} == set(fleet.node_ids)
            assert not app.hub.connected()


@pytest.mark.parametrize("token", [None, "maia_nope.nope", "not-a-token"])
async def test_an_unauthenticated_agent_is_refused_as_without_a_gateway(tmp_path: Path, token: str | None) -> None:
    async with gatewayed(tmp_path) as (app, stubs):
        answers = []
        for address in (app.address, app.agent_address):
            caller = Stubs.connect(address, token)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as refused_register:
                    await caller.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
                        node_id="n9", hostname="n9", rack="rack-a", accelerators=4, accelerator_model="maia-100",
                        hbm_gib=64)))
                code, refused_connect = await connect_answer(caller.agent, agent_pb2.Hello(node_id="n9", session_id="s"))
                assert code != grpc.StatusCode.OK, refused_connect
                answers.append([(e.code(), e.details()) for e in (refused_register.value, refused_connect)])
            finally:
                await caller.channel.close()
        direct, through_gateway = answers
        assert direct[0][0] == direct[1][0] == grpc.StatusCode.UNAUTHENTICATED
        assert through_gateway == direct
        assert await node(stubs, "n9") is None


async def test_a_revoked_credential_ends_the_relayed_stream_unauthenticated(tmp_path: Path) -> None:
    # The agent never heartbeats: a long timeout, so only the reset can end its stream.
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        credential = (await HandAgent(stubs, "n1", "rack-a").register()).node_credential
        through_gateway = Stubs.connect(app.agent_address, credential)
        try:
            agent = HandAgent(through_gateway, "n1", "rack-a")
            await agent.register()
            await agent.connect()
            await agent.next_set()
            await stubs.admin.ResetNodeCredential(admin_pb2.NodeRequest(id="n1"))
            ended = await agent.reader_error()  # at once, not at the agent's next call
            assert ended is not None and ended.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in ended.details() and "register again" in ended.details()
        finally:
            await through_gateway.channel.close()


async def test_gateways_as_many_as_the_default_executors_threads_leave_it_free(tmp_path: Path) -> None:
    """Each gateway's watcher waited for its process in a thread of the loop's default executor,
    held for as long as the gateway lived: with as many gateways as that pool has threads
    (min(32, cpus + 4)), nothing else run through `asyncio.to_thread` ran again (no placement, no
    GetVersion, which reads the schema's head so). Found in review."""
    workers = min(32, (os.cpu_count() or 1) + 4)
    async with running_controller(f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", tmp_path, agent_gateways=workers,
                                  agent_listen="127.0.0.1:0") as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            version = await stubs.admin.GetVersion(admin_pb2.GetVersionRequest(), timeout=20)
            assert version.schema_revision
        finally:
            await stubs.channel.close()


async def test_a_gateway_that_died_is_started_again_and_its_agents_come_back(tmp_path: Path) -> None:
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0, agent_gateway_restart_s=0.5) as (app, stubs):
        async with fleet_through_gateway(app, stubs, tmp_path, 2):
            [first] = app.gateways.processes
            first.send_signal(signal.SIGKILL)
            await eventually(lambda: _async(app.gateways.restarts), lambda n: n == 1, what="the gateway started again")
            [second] = app.gateways.processes
            assert second.pid != first.pid and second.poll() is None
            await ready_nodes(stubs, 2, "the agents back through the new gateway")
            [link] = app.relay.links.values()
            assert link.name == "gateway-0" and link.open_calls() == 2


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_followers_gateway_sends_agents_to_the_leader(db_url: str, tmp_path: Path) -> None:
    """Two controllers on one PostgreSQL: the follower's gateway answers as the follower does,
    UNAVAILABLE with the leader's address in the `maia-leader` trailing metadata."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_controller(db_url, tmp_path / "a") as leader, \
            running_controller(db_url, tmp_path / "b", agent_gateways=1, agent_listen="127.0.0.1:0") as follower:
        assert leader.election.should_run() and not follower.election.should_run()
        node_token = await issue_token(leader.db, "node-bootstrap")
        caller = Stubs.connect(follower.agent_address, node_token)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused_register:
                await caller.agent.Register(agent_pb2.RegisterRequest(
                    node=agent_pb2.NodeInfo(node_id="n1", rack="rack-00", accelerators=4)))
            code, refused_connect = await connect_answer(caller.agent, agent_pb2.Hello(node_id="n1", session_id="s"))
            assert code == grpc.StatusCode.UNAVAILABLE, refused_connect
        finally:
            await caller.channel.close()
        for refused in (refused_register.value, refused_connect):
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert ("maia-leader", leader.address) in tuple(refused.trailing_metadata())
            assert leader.address in refused.details()


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_agents_sent_on_by_a_follower_go_to_the_leaders_gateways(db_url: str, tmp_path: Path) -> None:
    """Two controllers on one PostgreSQL, the leader with gateways: the follower (on its --listen and
    through its own gateway) names the leader's agent address, and a fleet pointed at the follower
    ends up streaming through the leader's gateway."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_controller(db_url, tmp_path / "a", agent_gateways=1, agent_listen="127.0.0.1:0") as leader, \
            running_controller(db_url, tmp_path / "b", agent_gateways=1, agent_listen="127.0.0.1:0") as follower:
        assert leader.election.should_run() and not follower.election.should_run()
        node_token = await issue_token(leader.db, "node-bootstrap", name="fleet")
        for address in (follower.address, follower.agent_address):
            caller = Stubs.connect(address, node_token)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await caller.agent.Register(agent_pb2.RegisterRequest(
                        node=agent_pb2.NodeInfo(node_id="n1", rack="rack-00", accelerators=4)))
            finally:
                await caller.channel.close()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("maia-leader", leader.agent_address) in tuple(refused.value.trailing_metadata())

        stubs = Stubs.connect(leader.address, admin_token_of(leader))
        fleet = SimFleet(follower.address, racks=1, nodes_per_rack=2, token=node_token, log_dir=tmp_path)
        try:
            await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
            await ready_nodes(stubs, 2, "the fleet sent on to the leader")
            [link] = leader.relay.links.values()
            assert link.open_calls() == 2  # both streams through the leader's gateway, none on its --listen
            assert not follower.hub.connected()
        finally:
            await fleet.stop()
            await stubs.channel.close()


async def test_a_gateway_that_fails_to_start_every_time_is_tried_again_ever_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its port taken by another program: each start fails, and the controller waits twice as long
    before the next one (not an interpreter started every `agent_gateway_restart_s` forever)."""
    caplog.set_level(logging.ERROR, logger="maia.gateway")
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0, agent_gateway_restart_s=0.1) as (app, stubs):
        host, _, port = app.agent_address.rpartition(":")
        [gateway] = app.gateways.processes
        gateway.send_signal(signal.SIGKILL)
        with socket.socket() as squatter:  # no SO_REUSEPORT: the gateway's bind fails while it listens
            while True:
                try:
                    squatter.bind((host, int(port)))
                    break
                except OSError:  # the killed gateway still holds it
                    await asyncio.sleep(0.01)
            squatter.listen()
            await eventually(lambda: _async(app.gateways.restarts), lambda n: n >= 4, timeout=60,
                             what="four failed starts")
        waits = [float(m.group(1)) for r in caplog.records
                 if (m := re.search(r"starting it again in ([\d.]+)s", r.getMessage()))]
        assert waits[:4] == [0.1, 0.2, 0.4, 0.8]


async def test_a_relayed_stream_is_sent_no_more_than_its_window_ahead_of_what_its_agent_took(tmp_path: Path) -> None:
    """A gateway's agent that does not read its sets: the controller sends RELAY_WINDOW of them and
    then waits (its hub coalesces the rest, as gRPC's write makes it wait on the port), rather than
    send every set to be queued in the gateway for as long as the agent does not read; once the
    agent takes them, the stream goes on with the latest set."""
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        agent = HandAgent(stubs, "n1", "rack-a", accelerators=4 * RELAY_WINDOW)
        credential = (await agent.register()).node_credential
        # A gateway of the test's own on the controller's link socket: it reads every frame at once.
        channel = grpc.aio.insecure_channel(app.gateways.link_address, options=LINK_OPTIONS)
        to_controller: asyncio.Queue[relay_pb2.RelayFrame] = asyncio.Queue()

        async def frames() -> AsyncIterator[relay_pb2.RelayFrame]:
            while True:
                yield await to_controller.get()

        link = relay_pb2_grpc.AgentRelayStub(channel).Relay(frames(), metadata=((GATEWAY_METADATA_KEY, "slow"),))
        sets: list[agent_pb2.AssignmentSet] = []

        async def read() -> None:
            async for frame in link:
                sets.extend(agent_pb2.ControllerMessage.FromString(e.message).assignments
                            for e in frame.events if e.call == 1 and e.WhichOneof("body") == "message")

        reader = asyncio.create_task(read())
        try:
            hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_id="n1", session_id=agent.session_id))
            to_controller.put_nowait(relay_pb2.RelayFrame(events=[
                relay_pb2.RelayEvent(call=1, open=relay_pb2.RelayOpen(
                    method="/maia.v1.NodeAgentService/Connect", peer="ipv4:127.0.0.1:1",
                    metadata=[relay_pb2.RelayMetadatum(key="authorization", value=f"Bearer {credential}".encode())])),
                relay_pb2.RelayEvent(call=1, message=hello.SerializeToString())]))
            await place_one_by_one(stubs, 3 * RELAY_WINDOW)  # the agent taking none of their sets
            assert 0 < len(sets) <= RELAY_WINDOW
            while not sets or len(sets[-1].assignments) < 3 * RELAY_WINDOW:  # the agent takes what it was sent
                taken, before = len(sets), len(sets)
                to_controller.put_nowait(relay_pb2.RelayFrame(events=[relay_pb2.RelayEvent(call=1, taken=taken)]))
                await eventually(lambda: _async(len(sets)), lambda n: n > before or len(sets[-1].assignments) ==
                                 3 * RELAY_WINDOW, what="the sets after those taken")
        finally:
            reader.cancel()
            await channel.close()


async def place_one_by_one(stubs: Stubs, count: int) -> None:
    """Deployments d0.. placed one after the other (a set each for the node)."""
    for i in range(count):
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec(f"d{i}")))
        await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(
            name=f"d{i}", tenant="lab")), lambda d: d.phase == SCHEDULED, what=f"d{i} placed")


async def test_an_agent_reading_through_a_gateway_gets_every_set_past_the_window(tmp_path: Path) -> None:
    """The gateway tells the controller of each set its agent's transport took: a stream is not
    stopped after RELAY_WINDOW sets."""
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        credential = (await HandAgent(stubs, "n1", "rack-a", accelerators=4 * RELAY_WINDOW).register()).node_credential
        agent = HandAgent(Stubs.connect(app.agent_address, credential), "n1", "rack-a", accelerators=4 * RELAY_WINDOW)
        try:
            await agent.register()
            await agent.connect()
            await place_one_by_one(stubs, 2 * RELAY_WINDOW)
            await agent.next_set(lambda s: len(s.assignments) == 2 * RELAY_WINDOW)
        finally:
            await agent.close()
            await agent.stubs.channel.close()


async def test_a_gateway_that_exits_while_the_controller_stops_is_not_started_again(tmp_path: Path) -> None:
    """The gateway exits while the main server stops (before the watchers would have been told):
    its watcher ends rather than start a gateway that lingers after the stop."""
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0, agent_gateway_restart_s=0.0) as (app, stubs):
        gateways = app.gateways
        [gateway] = gateways.processes
        [watcher] = gateways._watchers
        server = app.server
        stop_server = server.stop

        async def stop_after_the_gateway_exited(grace: float | None) -> None:
            gateway.send_signal(signal.SIGKILL)
            await asyncio.to_thread(gateway.wait)
            await eventually(lambda: _async(watcher.done() or gateways.restarts), lambda seen: bool(seen),
                             what="the watcher saw the gateway exit")
            await stop_server(grace)

        server.stop = stop_after_the_gateway_exited  # type: ignore[method-assign]
    assert gateways.restarts == 0 and watcher.done() and not watcher.cancelled()
    assert gateways.pids() == [gateway.pid]


async def test_the_controllers_stop_ends_its_gateways_links_and_their_agents_streams_as_without_a_gateway(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The stop ends each link once its calls sent their statuses: the agent's stream ends as on the
    controller's port (the controller's UNAVAILABLE "controller is stopping", trailer and all, not the
    gateway's UNAVAILABLE for a lost link), and the link is not left
    for the relay server's grace to cancel (then logged unlinked, its calls ending as lost connections)."""
    caplog.set_level(logging.INFO, logger="maia.gateway")
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        credential = (await HandAgent(stubs, "n1", "rack-a").register()).node_credential
        through_gateway = Stubs.connect(app.agent_address, credential)
        agent = HandAgent(through_gateway, "n1", "rack-a")
        await agent.register()
        await agent.connect()
        await agent.next_set()
    try:
        ended = await agent.reader_error()  # as on the port: the hub ends the stream
        assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.details() == "controller is stopping: the stream of node n1 ended; connect to the next leader"
        assert controller_answered(ended.trailing_metadata())
    finally:
        await through_gateway.channel.close()
    unlinked = [r.getMessage() for r in caplog.records if "unlinked" in r.getMessage()]
    assert unlinked == ["agent gateway gateway-0 unlinked: the controller is stopping"]


async def test_the_gateways_stop_deadline_is_set_from_the_streams_they_hold_when_the_stop_begins(
        tmp_path: Path) -> None:
    """The controller tells its gateways how many agent streams they hold as its stop begins: their
    grace before the kill grows with them (`children.stop_grace_s`)."""
    told: list[int] = []
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0) as (app, stubs):
        assert app.gateways is not None
        stopping = app.gateways.stopping

        def recorded(streams: int = 0) -> None:
            told.append(streams)
            stopping(streams)

        app.gateways.stopping = recorded  # type: ignore[method-assign]
        channels = []
        for name in ("n1", "n2"):
            credential = (await HandAgent(stubs, name, "rack-a").register()).node_credential
            through_gateway = Stubs.connect(app.agent_address, credential)
            channels.append(through_gateway.channel)
            agent = HandAgent(through_gateway, name, "rack-a")
            await agent.register()
            await agent.connect()
            await agent.next_set()
    for channel in channels:
        await channel.close()
    assert told[0] == 2


# Pings every 0.5 s on the agents' connections and the gateways' links, unanswered after 0.5 s.
SHORT_KEEPALIVE = limits.Keepalive(client_time_ms=500, client_timeout_ms=500, server_time_ms=500,
                                   server_timeout_ms=500, server_min_ping_interval_ms=250)


async def test_a_gateway_that_hangs_loses_its_link_is_killed_and_started_again_and_its_agents_come_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway stopped (SIGSTOP: alive, answering nothing) kept its link and its port: its agents'
    streams hung and nothing restarted it. The link's keepalive pings go unanswered, the link is
    lost, and the gateway, which does not exit as one that lost its link does, is killed at the
    end of its grace (`children.stop_grace_s`) and started again."""
    monkeypatch.setattr(children, "STOP_GRACE_S", 1.0)
    caplog.set_level(logging.ERROR, logger="maia.gateway")
    async with gatewayed(tmp_path, heartbeat_timeout_s=60.0, agent_gateway_restart_s=0.1,
                         agent_keepalive=SHORT_KEEPALIVE) as (app, stubs):
        async with fleet_through_gateway(app, stubs, tmp_path, 2):
            [hung] = app.gateways.processes
            hung.send_signal(signal.SIGSTOP)
            try:
                await eventually(lambda: _async(app.gateways.restarts), lambda n: n == 1, timeout=30,
                                 what="the hung gateway started again")
                assert hung.poll() == -signal.SIGKILL
                [again] = app.gateways.processes
                assert again.pid != hung.pid and again.poll() is None
                await ready_nodes(stubs, 2, "the agents back through the new gateway")
                [link] = app.relay.links.values()
                assert link.name == "gateway-0" and link.open_calls() == 2
            finally:
                if hung.poll() is None:
                    hung.kill()
    assert any("hung; killed" in r.getMessage() for r in caplog.records)


# The test's hook, loaded by every Python process started with its directory on PYTHONPATH (a
# gateway is given the controller's PYTHON* variables): SIGUSR1 blocks the main thread, so the
# event loop, while gRPC's core threads go on answering HTTP/2's keepalive pings.
LOOP_STUCK_ON_SIGUSR1 = "import signal, time\nsignal.signal(signal.SIGUSR1, lambda *_: time.sleep(600))\n"
DOWN = common_pb2.NODE_STATE_DOWN


async def test_a_gateway_whose_event_loop_is_stuck_is_killed_and_started_again_before_its_agents_time_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway whose event loop is stuck (a blocking call) while its gRPC core still answers the
    link's keepalive pings kept its link: its agents' streams hung until their heartbeats timed out.
    It answers no ping of the relay's own (`RelayEvent.ping`): the controller ends its link, and
    the gateway is killed at the end of its grace and started again; its agents are back well
    before the heartbeat timeout would have judged them (their nodes never down)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(LOOP_STUCK_ON_SIGUSR1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(hooks), os.environ.get("PYTHONPATH")))))
    # A stop's grace this long would outlast the heartbeat timeout: a gateway lost to its pings is
    # killed after `children.STUCK_GRACE_S` instead, whatever the streams it holds.
    monkeypatch.setattr(children, "STOP_GRACE_S", 60.0)
    caplog.set_level(logging.ERROR, logger="maia.gateway")
    heartbeat_timeout_s = 20.0  # its link pings' timeout is 5 s (`frames.LINK_PING_TIMEOUT_MIN_S`)
    async with gatewayed(tmp_path, heartbeat_timeout_s=heartbeat_timeout_s, node_down_grace_s=30.0,
                         node_eviction_grace_s=90.0, agent_gateway_restart_s=0.1,
                         agent_keepalive=SHORT_KEEPALIVE) as (app, stubs):
        async with fleet_through_gateway(app, stubs, tmp_path, 2):
            [stuck] = app.gateways.processes
            states: set[int] = set()

            async def nodes() -> Any:
                listed = await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())
                states.update(n.state for n in listed.nodes)
                return listed

            stuck.send_signal(signal.SIGUSR1)
            began = asyncio.get_running_loop().time()
            try:
                await eventually(lambda: _async(app.gateways.restarts), lambda n: n == 1,
                                 timeout=heartbeat_timeout_s, what="the stuck gateway started again")
                assert stuck.poll() == -signal.SIGKILL  # it did not exit on its own: its loop was stuck
                [again] = app.gateways.processes
                assert again.pid != stuck.pid and again.poll() is None
                await eventually(nodes, lambda r: sum(n.connected and n.state == READY for n in r.nodes) == 2,
                                 timeout=heartbeat_timeout_s, what="the agents back through the new gateway")
                assert asyncio.get_running_loop().time() - began < heartbeat_timeout_s
                assert DOWN not in states
                [link] = app.relay.links.values()
                assert link.name == "gateway-0" and link.open_calls() == 2
            finally:
                if stuck.poll() is None:
                    stuck.kill()
    messages = [r.getMessage() for r in caplog.records]
    assert any("answered no ping on its link" in m for m in messages)
    assert any("hung; killed" in m for m in messages)


async def test_a_gateway_is_given_the_controllers_agent_keepalive(tmp_path: Path) -> None:
    """The gateway serves the agents with the controller's keepalive settings (as its own port
    does) and pings its link with them: it is told them as `--keepalive`."""
    async with gatewayed(tmp_path, agent_keepalive=SHORT_KEEPALIVE) as (app, stubs):
        [gateway] = app.gateways.processes
        argv = Path(f"/proc/{gateway.pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--keepalive") + 1] == "500,500,500,500,250"
