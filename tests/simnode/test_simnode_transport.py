"""A simulated node against a fake controller: a real grpc.aio server on 127.0.0.1:0 that
speaks NodeAgentService and records everything the agent sends."""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from controller.simnode.protocol import NodeSpec
from controller.simnode.transport import Backoff, SimulatedNode, status_lost
from maia.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.addresses import closed_port_address


class FakeController(agent_pb2_grpc.NodeAgentServiceServicer):
    def __init__(self) -> None:
        self.registrations: list[agent_pb2.NodeInfo] = []
        self.peers: list[str] = []  # the connection each Register came on
        self.received: list[agent_pb2.AgentMessage] = []
        self.outgoing: asyncio.Queue = asyncio.Queue()
        self.streams_opened = 0
        self.streams_closed_by_client = 0
        self.register_interval_ms = 200  # the interval a Register tells

    async def Register(self, request, context):  # noqa: N802 (gRPC naming)
        self.registrations.append(request.node)
        self.peers.append(context.peer())
        return agent_pb2.RegisterResponse(node_id=request.node.node_id,
                                          session_id=f"s{len(self.registrations)}",
                                          heartbeat_interval_ms=self.register_interval_ms)

    async def Connect(self, request_iterator, context) -> AsyncIterator[agent_pb2.ControllerMessage]:  # noqa: N802
        self.streams_opened += 1
        done = asyncio.Event()

        async def read() -> None:
            async for message in request_iterator:
                self.received.append(message)
            self.streams_closed_by_client += 1
            done.set()

        reader = asyncio.create_task(read())
        try:
            while not done.is_set():
                getter = asyncio.create_task(self.outgoing.get())
                finished, _ = await asyncio.wait({getter, asyncio.create_task(done.wait())},
                                                 return_when=asyncio.FIRST_COMPLETED)
                if getter not in finished:
                    getter.cancel()
                    break
                item = getter.result()
                if item == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "controller restarting")
                yield item
        finally:
            reader.cancel()

    # --- what the agent said ---
    def hellos(self) -> list[agent_pb2.Hello]:
        return [m.hello for m in self.received if m.HasField("hello")]

    def heartbeats(self) -> list[agent_pb2.Heartbeat]:
        return [m.heartbeat for m in self.received if m.HasField("heartbeat")]

    def last_state(self) -> list[agent_pb2.ShardStatus]:
        """The shards of the last heartbeat that carried the node's state (one may omit it)."""
        return list([b for b in self.heartbeats() if not b.shards_omitted][-1].shards)

    def heartbeats_of_session(self, n: int) -> list[agent_pb2.Heartbeat]:
        """The heartbeats sent after the n-th Hello (1-based) and before the next one."""
        hellos, beats = 0, []
        for m in self.received:
            hellos += m.HasField("hello")
            if hellos == n and m.HasField("heartbeat"):
                beats.append(m.heartbeat)
        return beats

    def statuses(self) -> list[tuple[str, int, int, int]]:
        return [(s.deployment, s.shard, s.phase, s.generation)
                for m in self.received if m.HasField("shard_status") for s in [m.shard_status]]


def assignment_set(generation: int, *shards: int) -> agent_pb2.ControllerMessage:
    return agent_pb2.ControllerMessage(assignments=agent_pb2.AssignmentSet(
        generation=generation,
        assignments=[agent_pb2.Assignment(
            deployment="claude", tenant="anthropic", replica=0, shard=s, shards_per_replica=4,
            accelerator_indices=[s], spec=common_pb2.ShardSpec(accelerators=1, power_w=700.0),
            generation=generation) for s in shards]))


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def started(controller: FakeController) -> tuple[grpc.aio.Server, str]:
    """A gRPC server serving `controller` on a port of its own, and its address."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_NodeAgentServiceServicer_to_server(controller, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeController, str]]:
    controller = FakeController()
    server, address = await started(controller)
    yield controller, address
    await server.stop(grace=None)


async def test_register_hello_assign_load_run_stop(fake: tuple[FakeController, str]) -> None:
    controller, address = fake
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), address, load_delay_s=0.2)
    task = asyncio.create_task(node.run())
    await wait_until(lambda: controller.hellos())
    assert controller.registrations[0].rack == "rack-00"
    assert controller.registrations[0].accelerators == 4
    assert controller.hellos()[0].node_id == "rack-00-n00"
    assert controller.hellos()[0].session_id == "s1"
    await wait_until(lambda: controller.heartbeats())
    assert controller.heartbeats()[0].power_draw_w == 600.0

    await controller.outgoing.put(assignment_set(1, 0, 1))
    running = common_pb2.SHARD_PHASE_RUNNING
    await wait_until(lambda: sum(1 for s in controller.statuses() if s[2] == running) == 2)
    loading = [s for s in controller.statuses() if s[2] == common_pb2.SHARD_PHASE_LOADING]
    assert sorted(s[1] for s in loading) == [0, 1]
    # the next heartbeat carries both running shards and their power
    await wait_until(lambda: controller.heartbeats()[-1].power_draw_w == 600.0 + 2 * 700.0)
    assert {s.shard for s in controller.last_state()} == {0, 1}

    await controller.outgoing.put(assignment_set(0))  # stale: ignored
    await controller.outgoing.put(assignment_set(2, 1))  # shard 0 removed
    await wait_until(lambda: ("claude", 0, common_pb2.SHARD_PHASE_STOPPED, 1) in controller.statuses())
    assert node.agent.stale_ignored == 1
    await wait_until(lambda: [s.shard for s in controller.last_state()] == [1])

    node.stop()
    await asyncio.wait_for(task, timeout=5)
    assert controller.streams_closed_by_client == 1  # half-closed, not cut


async def test_reconnects_and_registers_again_after_the_stream_breaks(fake: tuple[FakeController, str]) -> None:
    controller, address = fake
    node = SimulatedNode(NodeSpec("rack-00-n01", "rack-00"), address, load_delay_s=0.0,
                         backoff=Backoff(initial_s=0.05, maximum_s=0.1))
    task = asyncio.create_task(node.run())
    await controller.outgoing.put(assignment_set(3, 2))
    await wait_until(lambda: any(s[2] == common_pb2.SHARD_PHASE_RUNNING for s in controller.statuses()))
    await controller.outgoing.put("abort")
    await wait_until(lambda: len(controller.registrations) == 2)
    await wait_until(lambda: len(controller.hellos()) == 2)
    assert controller.hellos()[1].session_id == "s2"
    # the shard survived the reconnect and is reported in the new session's first heartbeat
    await wait_until(lambda: controller.heartbeats_of_session(2))
    first = controller.heartbeats_of_session(2)[0]
    assert not first.shards_omitted and [s.shard for s in first.shards] == [2]
    node.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_a_stream_its_controller_dropped_leaves_nothing_reading_its_requests() -> None:
    """A controller gone (killed, failed over) ends the stream: gRPC's task reading the stream's
    requests from the agent's outbox waited on it for good, and was destroyed pending at a later
    collection ("Task was destroyed but it is pending!", an error logged per node and failover)."""
    controller = FakeController()
    controller.register_interval_ms = 60_000  # no heartbeat comes to wake it
    server, address = await started(controller)
    node = SimulatedNode(NodeSpec("rack-00-n09", "rack-00"), address, load_delay_s=0.0,
                         backoff=Backoff(initial_s=5.0, maximum_s=5.0))
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: controller.heartbeats())
        assert _reading_requests(node) == 1
        await server.stop(grace=None)  # the controller is gone
        await wait_until(lambda: not node.connected)
        await wait_until(lambda: _reading_requests(node) == 0)
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=10)


def _reading_requests(node: SimulatedNode) -> int:
    """gRPC's tasks reading requests from `node`'s streams (its `_outbound` generators), pending
    now (those of other tests' nodes on this loop are not counted)."""
    count = 0
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        if task.done() or "_consume_request_iterator" not in coro.__qualname__ or coro.cr_frame is None:
            continue
        requests = getattr(coro.cr_frame.f_locals.get("request_iterator"), "ag_frame", None)
        count += requests is not None and requests.f_locals.get("self") is node
    return count


async def test_a_heartbeat_omits_an_unchanged_shard_state_and_carries_it_when_it_changed_or_is_asked_for(
        fake: tuple[FakeController, str]) -> None:
    controller, address = fake
    node = SimulatedNode(NodeSpec("rack-00-n04", "rack-00"), address, load_delay_s=0.0)
    task = asyncio.create_task(node.run())
    await wait_until(lambda: len(controller.heartbeats()) >= 2)
    first, second = controller.heartbeats()[:2]
    assert not first.shards_omitted and first.shard_state_version > 0  # a stream's first heartbeat: in full
    assert second.shards_omitted and second.shard_state_version == first.shard_state_version

    count = len(controller.heartbeats())
    await controller.outgoing.put(agent_pb2.ControllerMessage(shard_state_request=agent_pb2.ShardStateRequest()))
    await wait_until(lambda: any(not b.shards_omitted for b in controller.heartbeats()[count:]))
    asked = next(b for b in controller.heartbeats()[count:] if not b.shards_omitted)
    assert asked.shard_state_version == first.shard_state_version and not asked.shards

    await controller.outgoing.put(assignment_set(1, 3))
    running = common_pb2.SHARD_PHASE_RUNNING
    await wait_until(lambda: [(s.shard, s.phase) for s in controller.last_state()] == [(3, running)])
    changed = [b for b in controller.heartbeats() if not b.shards_omitted][-1]
    assert changed.shard_state_version != first.shard_state_version
    count = len(controller.heartbeats())
    await wait_until(lambda: len(controller.heartbeats()) > count)
    assert controller.heartbeats()[-1].shards_omitted  # unchanged again
    assert controller.heartbeats()[-1].shard_state_version == controller.heartbeats()[-2].shard_state_version
    node.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_a_node_beats_at_the_interval_the_controller_tells_on_its_stream(
        fake: tuple[FakeController, str]) -> None:
    """Registered with 200 ms, told a minute (HeartbeatPolicy): after the heartbeat already due it
    sends none for a second (five at 200 ms)."""
    controller, address = fake
    node = SimulatedNode(NodeSpec("rack-00-n05", "rack-00"), address, load_delay_s=0.0)
    task = asyncio.create_task(node.run())
    await wait_until(lambda: len(controller.heartbeats()) >= 2)
    assert node.heartbeat_interval_s == 0.2
    await controller.outgoing.put(agent_pb2.ControllerMessage(
        heartbeat_policy=agent_pb2.HeartbeatPolicy(heartbeat_interval_ms=60_000)))
    await wait_until(lambda: node.heartbeat_interval_s == 60.0)
    sent = len(controller.heartbeats())
    await asyncio.sleep(1.0)
    assert len(controller.heartbeats()) - sent <= 1
    node.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_a_hello_states_the_interval_the_node_beats_at(fake: tuple[FakeController, str]) -> None:
    """Each stream's Hello states the interval the node follows then: its Register's (a Register
    again after a HeartbeatPolicy was adopted supersedes it), or the one `--heartbeat-interval` fixed."""
    controller, address = fake
    node = SimulatedNode(NodeSpec("rack-00-n06", "rack-00"), address, load_delay_s=0.0,
                         backoff=Backoff(initial_s=0.05, maximum_s=0.1))
    task = asyncio.create_task(node.run())
    await wait_until(lambda: len(controller.hellos()) == 1)
    assert controller.hellos()[0].heartbeat_interval_ms == 200
    await controller.outgoing.put(agent_pb2.ControllerMessage(
        heartbeat_policy=agent_pb2.HeartbeatPolicy(heartbeat_interval_ms=60_000)))
    await wait_until(lambda: node.heartbeat_interval_s == 60.0)
    controller.register_interval_ms = 7_000
    await controller.outgoing.put("abort")
    await wait_until(lambda: len(controller.hellos()) == 2)
    assert controller.hellos()[1].heartbeat_interval_ms == 7_000
    node.stop()
    await asyncio.wait_for(task, timeout=5)

    fixed = SimulatedNode(NodeSpec("rack-00-n07", "rack-00"), address, load_delay_s=0.0, heartbeat_interval_s=0.5)
    task = asyncio.create_task(fixed.run())
    await wait_until(lambda: len(controller.hellos()) == 3)
    assert controller.hellos()[2].heartbeat_interval_ms == 500
    fixed.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_crash_drops_shards_and_comes_back(fake: tuple[FakeController, str]) -> None:
    controller, address = fake
    node = SimulatedNode(NodeSpec("rack-00-n02", "rack-00"), address, load_delay_s=0.0)
    task = asyncio.create_task(node.run())
    await controller.outgoing.put(assignment_set(1, 0))
    await wait_until(lambda: any(s[2] == common_pb2.SHARD_PHASE_RUNNING for s in controller.statuses()))
    node.crash(offline_s=0.2)
    assert node.agent.reports() == []
    await wait_until(lambda: len(controller.registrations) == 2)
    await wait_until(lambda: node.connected)
    node.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_stop_while_the_controller_is_unreachable_returns_promptly() -> None:
    node = SimulatedNode(NodeSpec("rack-00-n03", "rack-00"), closed_port_address(),
                         backoff=Backoff(initial_s=5.0, maximum_s=5.0))
    task = asyncio.create_task(node.run())
    await asyncio.sleep(0.3)
    node.stop()
    await asyncio.wait_for(task, timeout=2)


async def test_a_fleet_with_shared_channels_multiplexes_its_nodes_on_one_connection(
        fake: tuple[FakeController, str]) -> None:
    """maia-simnode --shared-channel: every node's calls on one connection; a node that stops
    leaves it open for the others."""
    controller, address = fake
    shared: dict[str, grpc.aio.Channel] = {}
    nodes = [SimulatedNode(NodeSpec(f"rack-00-n0{i}", "rack-00"), address, shared_channels=shared) for i in range(2)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    await wait_until(lambda: len(controller.hellos()) == 2)
    assert len(shared) == 1 and len(set(controller.peers)) == 1
    nodes[0].stop()
    await asyncio.wait_for(tasks[0], timeout=5)
    beats = len(controller.heartbeats())
    await wait_until(lambda: len(controller.heartbeats()) > beats + 1)  # the other still beats on it
    nodes[1].stop()
    await asyncio.wait_for(tasks[1], timeout=5)
    await shared[address].close()


async def test_nodes_without_a_shared_channel_each_have_a_connection_of_their_own(
        fake: tuple[FakeController, str]) -> None:
    """As real agents on their servers: gRPC core's global subchannel pool gave the channels of a
    process with the same target and options one connection, and the whole fleet ran on it
    with or without --shared-channel (found in review)."""
    controller, address = fake
    nodes = [SimulatedNode(NodeSpec(f"rack-00-n0{i}", "rack-00"), address) for i in range(3)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        await wait_until(lambda: len(controller.hellos()) == 3)
        assert len(set(controller.peers)) == 3
    finally:
        for n in nodes:
            n.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def recorded_pauses(monkeypatch: pytest.MonkeyPatch, node: SimulatedNode) -> list[float]:
    """The node's pauses before each next attempt, recorded and not waited (its other waits are)."""
    from controller.simnode import transport

    pauses: list[float] = []
    real_wait = transport.wait_event

    async def recorded(event: asyncio.Event, timeout_s: float) -> bool:
        if event is node._stopping:  # a pause before the next attempt: noted, not waited
            pauses.append(timeout_s)
            return False
        return await real_wait(event, timeout_s)

    monkeypatch.setattr(transport, "wait_event", recorded)
    return pauses


class RefusingController(FakeController):
    """Refuses the first Registers: `told` of them busy with a retry time (retry-after-ms), then
    `silent` of them UNAVAILABLE with none, then registers."""

    def __init__(self, told: int, silent: int, retry_after_ms: int) -> None:
        super().__init__()
        self.refusals = ["told"] * told + ["silent"] * silent
        self.retry_after_ms = retry_after_ms
        self.calls = 0

    async def Register(self, request, context):  # noqa: N802 (gRPC naming)
        self.calls += 1
        if self.refusals:
            kind = self.refusals.pop(0)
            trailing = (("retry-after-ms", str(self.retry_after_ms)),) if kind == "told" else ()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "busy", trailing_metadata=trailing)
        return await super().Register(request, context)


async def test_a_refused_agent_waits_what_it_is_told_jittered_else_backs_off_exponentially(monkeypatch) -> None:
    """The agent's pauses between Registers (recorded, not slept): told 7 s, it waits 7 s stretched
    by up to its jitter, never less, and not all alike; refused with no time, it backs off
    exponentially with jitter (0.5 s, 1 s, 2 s ceilings, each at least half its ceiling); then it
    registers and connects."""
    controller = RefusingController(told=3, silent=3, retry_after_ms=7000)
    server, controller_address = await started(controller)
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), controller_address, load_delay_s=0.0,
                         backoff=Backoff(rng=random.Random(7)))
    pauses = recorded_pauses(monkeypatch, node)
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: controller.hellos())
        assert controller.calls == 7 and node.register_failures == {"UNAVAILABLE": 6}
        told, silent = pauses[:3], pauses[3:6]
        assert all(7.0 <= p <= 7.0 * (1 + node.backoff.retry_jitter) for p in told) and len(set(told)) == 3
        for pause, ceiling in zip(silent, (0.5, 1.0, 2.0), strict=True):
            assert ceiling / 2 <= pause <= ceiling
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=5)
        await server.stop(grace=None)


class HungController(FakeController):
    """Accepts the connection and the call, and never answers a Register (a hung process)."""

    async def Register(self, request, context):  # noqa: N802 (gRPC naming)
        self.registrations.append(request.node)
        await asyncio.Event().wait()


async def test_an_agent_whose_register_a_hung_controller_never_answers_tries_the_next_one(
        fake: tuple[FakeController, str]) -> None:
    """A hung controller keeps its connection up and lets the Register run to its deadline; with
    several controllers the agent goes on to the next, as from one that refused or died, instead
    of calling the hung one again and again."""
    controller, address = fake
    hung = HungController()
    server, hung_address = await started(hung)
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), f"{hung_address},{address}", load_delay_s=0.0,
                         # 2 s: the good controller's first Register (a new connection) must beat it on a loaded host
                         register_timeout_s=2.0, backoff=Backoff(initial_s=0.05, maximum_s=0.05))
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: controller.hellos(), timeout=20)
        assert len(hung.registrations) == 1 and node.register_failures == {"DEADLINE_EXCEEDED": 1}
        assert node.controller == address
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=5)
        await server.stop(grace=None)


class StartingController(FakeController):
    """Answers every Register as a starting controller does (`api.server.STARTING`): UNAVAILABLE
    with a retry time and the `maia-controller-state: starting` trailer."""

    async def Register(self, request, context):  # noqa: N802 (gRPC naming)
        self.registrations.append(request.node)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the controller is starting",
                            trailing_metadata=(("retry-after-ms", "500"), ("maia-controller-state", "starting")))


async def test_a_cancelled_node_cancels_the_register_under_way() -> None:
    """The node's task cancelled (an embedder's, a test's) cancels its Register on the wire too:
    waited for beside the stop, it ran on to its deadline and its error was never retrieved."""
    cancelled = asyncio.Event()

    class Noting(HungController):
        async def Register(self, request, context):  # noqa: N802 (gRPC naming)
            try:
                await super().Register(request, context)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    hung = Noting()
    server, address = await started(hung)
    channels: dict = {}
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), address, register_timeout_s=60.0,
                         shared_channels=channels)  # the channel outlives the node: nothing else cancels the call
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: hung.registrations, timeout=20)
        task.cancel()
        await asyncio.wait_for(cancelled.wait(), timeout=5)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for channel in channels.values():
            await channel.close()
        await server.stop(grace=None)


async def test_a_stop_ends_a_register_a_hung_controller_holds() -> None:
    """A stop cancels the Register under way: it waited out --register-timeout (10 s) against a
    hung controller, past a supervisor's patience, and then connected only to close."""
    hung = HungController()
    server, address = await started(hung)
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), address, register_timeout_s=60.0)
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: hung.registrations, timeout=20)
        node.stop()
        await asyncio.wait_for(task, timeout=5)
        assert node.sessions == 0 and node.register_failures == {}
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=5)
        await server.stop(grace=None)


@pytest.mark.parametrize("others", [True, False], ids=["with-others", "alone"])
async def test_an_agent_told_starting_tries_the_next_controller_if_it_has_one(
        fake: tuple[FakeController, str], others: bool, monkeypatch) -> None:
    """A starting controller leads no one yet: an agent given several controllers goes on to the
    next at once rather than waiting out the retry time on it; given only that one, it waits what
    it is told (0.5 s, jittered) and calls it again."""
    from controller.simnode import transport

    controller, address = fake
    starting = StartingController()
    server, starting_address = await started(starting)
    addresses = f"{starting_address},{address}" if others else starting_address
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), addresses, load_delay_s=0.0,
                         backoff=Backoff(rng=random.Random(3)))
    pauses = recorded_pauses(monkeypatch, node)
    task = asyncio.create_task(node.run())
    try:
        if others:
            await wait_until(lambda: controller.hellos(), timeout=10)
            assert len(starting.registrations) == 1 and node.controller == address
            low, high = transport.NO_LEADER_DELAY_S  # the pause before the next controller
            assert low <= pauses[0] <= high
        else:
            await wait_until(lambda: len(starting.registrations) >= 3, timeout=10)
            assert node.controller == starting_address and not controller.registrations
            assert all(0.5 <= p <= 0.5 * (1 + node.backoff.retry_jitter) for p in pauses[:2])
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=5)
        await server.stop(grace=None)


class RefusesAfterTheFirstSet(FakeController):
    """A controller that ends every stream at the agent's first heartbeat, after its first set
    (as it does for a report it refuses)."""

    async def Connect(self, request_iterator, context):  # noqa: N802
        yield agent_pb2.ControllerMessage(assignments=agent_pb2.AssignmentSet(generation=1))
        async for message in request_iterator:
            if message.HasField("heartbeat"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a heartbeat reason over 256 characters")


async def test_the_backoff_grows_while_each_stream_ends_after_its_first_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was reset at every set, and the first comes before the controller reads a report: a
    stream ended at once for what the agent reports was tried again every half second for ever
    (found in review)."""
    controller = RefusesAfterTheFirstSet()
    server, address = await started(controller)
    node = SimulatedNode(NodeSpec("rack-00-n00", "rack-00"), address, load_delay_s=0.0,
                         backoff=Backoff(rng=random.Random(1)))
    pauses = recorded_pauses(monkeypatch, node)  # noted, not slept
    task = asyncio.create_task(node.run())
    try:
        await wait_until(lambda: len(pauses) >= 8, timeout=20)
        assert max(pauses[:8]) > 2.0, pauses[:8]
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=5)
        await server.stop(grace=None)


def test_an_answer_grpcios_client_replaced_is_told_from_the_controllers_own() -> None:
    """grpc/grpc#36066: a message written as the controller ends the stream fails, and the
    client's INTERNAL replaces the controller's answer; only that exact answer is taken for it."""
    def error(code: grpc.StatusCode, details: str, debug: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug)

    lost = 'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f58>,)'
    assert status_lost(error(grpc.StatusCode.INTERNAL, "Internal error from Core", lost))
    assert not status_lost(error(grpc.StatusCode.INTERNAL, "the controller failed", lost))
    assert not status_lost(error(grpc.StatusCode.INTERNAL, "Internal error from Core", "RST_STREAM"))
    assert not status_lost(error(grpc.StatusCode.UNAVAILABLE, "Internal error from Core", lost))
