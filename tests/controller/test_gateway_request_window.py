"""The flow control of a relayed call's requests (controller/gateway/frames.py): the gateway reads
no more of an agent's stream while `REQUEST_WINDOW_BYTES` of it are ahead of what the
controller's handler took (told in `RelayEvent.taken`), nor while its outbox is over its bounds;
HTTP/2 then holds the agent back at the gateway's port, as at the controller's without a gateway.

Without it an agent streaming faster than its handler read was held back by nothing but the
controller's backstop (`limits.RELAYED_UNREAD_BYTES_MAX`, which fails the call), and a link slower
than its agents grew the gateway's outbox without bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from controller import limits
from controller.gateway import relay
from controller.gateway.frames import (
    LINK_OPTIONS, REQUEST_OVERHEAD_BYTES, REQUEST_TAKEN_TOLD_BYTES, REQUEST_WINDOW_BYTES, Outbox, link_server_options,
    request_weight,
)
from controller.gateway.process import Gateway
from controller.gateway.relay import RelayedRequests, RelayServicer
from maia.v1 import agent_pb2, common_pb2, relay_pb2, relay_pb2_grpc

CONNECT = "/maia.v1.NodeAgentService/Connect"


def test_a_well_behaved_gateway_never_reaches_the_controllers_backstop_and_a_normal_agent_never_waits() -> None:
    # Ahead of what the handler took: less than the window, then one message (the gateway's port's limit).
    assert REQUEST_WINDOW_BYTES + request_weight(b"x" * limits.MAX_RECEIVE_MESSAGE_BYTES) \
        < limits.RELAYED_UNREAD_BYTES_MAX
    assert REQUEST_TAKEN_TOLD_BYTES <= REQUEST_WINDOW_BYTES  # a call whose handler took all is never held
    # The largest burst the hub accepts at once (a full node's shards reported LOADING, then RUNNING,
    # names at their longest) and a full heartbeat fit beside what was not told yet.
    status = agent_pb2.ShardStatus(deployment="d" * limits.NAME_MAX, replica=limits.REPLICAS_MAX - 1,
                                   shard=limits.SHARDS_PER_REPLICA_MAX - 1, generation=1 << 40,
                                   phase=common_pb2.SHARD_PHASE_RUNNING, message="loaded", power_draw_w=700.0,
                                   tenant="t" * limits.TENANT_ID_MAX, deployment_uid=1 << 40)
    report = agent_pb2.AgentMessage(shard_status=status).SerializeToString()
    beat = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(
        seq=1 << 40, power_draw_w=7000.0, shards=[status] * limits.SHARDS_PER_NODE_MAX,
        shard_state_version=1 << 40)).SerializeToString()
    burst = limits.REPORTS_BURST * request_weight(report) + request_weight(beat)
    assert burst + REQUEST_TAKEN_TOLD_BYTES < REQUEST_WINDOW_BYTES


# --- the controller tells what a call's handler took -------------------------------------------

async def test_what_a_handler_reads_or_is_pushed_is_told_once_it_weighs_the_threshold(monkeypatch: Any) -> None:
    monkeypatch.setattr(relay, "REQUEST_TAKEN_TOLD_BYTES", 3 * request_weight(b"x"))
    told: list[int] = []
    requests = RelayedRequests(None, told.append)
    for _ in range(4):
        requests.put(b"x")
    assert told == []  # arrived, not taken
    assert [await anext(requests), await anext(requests)] == [b"x", b"x"] and told == []
    await anext(requests)
    assert told == [3 * request_weight(b"x")]
    taken: list[bytes] = []
    requests.push_to(taken.append, lambda error: None)  # the one waiting, then each as it arrives
    requests.put(b"x")
    assert told == [3 * request_weight(b"x")]
    requests.put(b"y" * 1000)  # one past the threshold: told with it
    assert taken == [b"x", b"x", b"y" * 1000]
    assert told == [3 * request_weight(b"x"), 2 * request_weight(b"x") + request_weight(b"y" * 1000)]


# --- the gateway's outbox: a slow link holds the agents back -----------------------------------

async def _drain(outbox: Outbox, into: list[relay_pb2.RelayEvent], frames: int) -> None:
    """Take `frames` frames of `outbox` (the link sending them), their events into `into`."""
    stream = outbox.frames()
    for _ in range(frames):
        frame = await asyncio.wait_for(anext(stream), 5)
        into.extend(frame.events)


async def test_producers_wait_their_turn_while_the_outbox_is_over_its_bound_and_control_events_do_not() -> None:
    outbox = Outbox(0.0, bytes_max=3000)
    sent: dict[int, int] = {1: 0, 2: 0}

    async def produce(call: int) -> None:
        for i in range(10):
            await outbox.message_in_turn(call, b"%d:%d:" % (call, i) + b"x" * 1000)
            sent[call] += 1

    producers = [asyncio.create_task(produce(call)) for call in (1, 2)]
    await asyncio.sleep(0.01)  # nothing takes the outbox's frames: the link is behind
    assert outbox.queued_bytes <= 3000 + 1010 and sum(sent.values()) <= 4
    assert outbox.producers_waiting == 2
    outbox.add(relay_pb2.RelayEvent(call=1, taken=1))  # a control event is never held
    outbox.add(relay_pb2.RelayEvent(call=1, end=relay_pb2.RelayEnd(cancelled=False)))
    events: list[relay_pb2.RelayEvent] = []
    await _drain(outbox, events, 1)  # one frame leaves: the waiting ones go in, in order
    await asyncio.sleep(0)
    assert sum(sent.values()) > 4
    while not all(task.done() for task in producers):
        await _drain(outbox, events, 1)
        await asyncio.sleep(0)
        assert outbox.queued_bytes <= 3000 + 1010
    outbox.close()
    events.extend(event for frame in [f async for f in outbox.frames()] for event in frame.events)
    for call in (1, 2):
        assert [e.message.split(b":")[1] for e in events if e.call == call and e.WhichOneof("body") == "message"] \
            == [b"%d" % i for i in range(10)]
    assert sum(e.WhichOneof("body") != "message" for e in events) == 2


async def test_the_event_bound_holds_producers_too_and_a_cancelled_one_sends_nothing_nor_blocks_the_rest() -> None:
    outbox = Outbox(0.0, events_max=2)
    outbox.add(relay_pb2.RelayEvent(call=9, taken=1))
    outbox.add(relay_pb2.RelayEvent(call=9, taken=1))
    first = asyncio.create_task(outbox.message_in_turn(1, b"gone"))
    second = asyncio.create_task(outbox.message_in_turn(2, b"kept"))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    first.cancel()  # its agent's call is gone
    await asyncio.sleep(0)
    events: list[relay_pb2.RelayEvent] = []
    await _drain(outbox, events, 1)
    await asyncio.wait_for(second, 5)
    outbox.close()
    events.extend(event for frame in [f async for f in outbox.frames()] for event in frame.events)
    assert [e.message for e in events if e.WhichOneof("body") == "message"] == [b"kept"]


async def test_a_closed_outbox_lets_its_waiting_producers_go() -> None:
    outbox = Outbox(0.0, events_max=1)
    outbox.message(1, b"a")
    waiting = asyncio.create_task(outbox.message_in_turn(1, b"b"))
    await asyncio.sleep(0)
    assert not waiting.done()
    outbox.close()
    await asyncio.wait_for(waiting, 5)


class AgentCall:
    """What the gateway reads of an agent's call (a `grpc.aio.ServicerContext`'s part)."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def test_a_gateways_pumps_wait_while_its_outbox_is_over_its_bound_and_resume_as_it_drains() -> None:
    gateway = Gateway("gateway-0", linger_s=0.0)
    gateway.linked = True
    gateway.outbox = Outbox(0.0, bytes_max=8 * 1024)
    read = {1: 0, 2: 0}

    async def agent(n: int) -> AsyncIterator[bytes]:
        for i in range(100):
            read[n] += 1
            yield b"%d:%d:" % (n, i) + b"x" * 1024

    calls = [asyncio.create_task(anext(gateway.connect(agent(n), AgentCall())))  # type: ignore[arg-type]
             for n in (1, 2)]
    await asyncio.sleep(0.05)  # nothing takes the outbox's frames: the link is behind
    assert gateway.outbox.producers_waiting == 2
    assert sum(read.values()) <= 8 + 2  # the 8 KiB bound, then one each waiting its turn: no more read
    events: list[relay_pb2.RelayEvent] = []
    drained = asyncio.create_task(_drain(gateway.outbox, events, 10_000))
    try:
        await asyncio.wait_for(_until(lambda: sum(e.WhichOneof("body") == "end" for e in events) == 2), 5)
    finally:
        drained.cancel()
        for call in calls:
            call.cancel()
    assert read == {1: 100, 2: 100}
    for n in (1, 2):
        assert [e.message for e in events if e.call == n and e.WhichOneof("body") == "message"] \
            == [b"%d:%d:" % (n, i) + b"x" * 1024 for i in range(100)]


async def test_a_register_waits_its_turn_while_the_outbox_is_over_its_bound() -> None:
    # Registers are relayed before the controller checks any token: many of 4 MiB at once grew
    # the outbox past its bound while the link was behind.
    gateway = Gateway("gateway-0", linger_s=0.0)
    gateway.linked = True
    gateway.outbox = Outbox(0.0, bytes_max=8 * 1024)
    gateway.outbox.message(99, b"y" * 8 * 1024)  # a stream's message: the outbox at its bound
    register = asyncio.create_task(gateway.register(b"r" * 1024, AgentCall()))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert gateway.outbox.producers_waiting == 1  # its request waits; its opening went at once
    events: list[relay_pb2.RelayEvent] = []
    drained = asyncio.create_task(_drain(gateway.outbox, events, 10_000))
    try:
        await asyncio.wait_for(_until(lambda: any(e.WhichOneof("body") == "end" for e in events)), 5)
    finally:
        drained.cancel()
        register.cancel()
    bodies = [e.WhichOneof("body") for e in events if e.call != 99]
    assert bodies == ["open", "message", "end"]  # in order, the request after the opening


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.005)


async def _settled(value: Any, quiet_s: float = 0.5) -> None:
    """Return once `value()` has not changed for `quiet_s`."""
    last, since = value(), asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - since < quiet_s:
        await asyncio.sleep(0.02)
        if value() != last:
            last, since = value(), asyncio.get_running_loop().time()


# --- a relayed stream whose handler reads slowly: the agent is held back -----------------------

MESSAGE = 16 * 1024
MESSAGES = 600  # 9.6 MiB: over twice what HTTP/2 lets an agent write ahead at the gateway's port
WINDOW_MESSAGES = 8


async def test_a_handler_that_reads_slowly_holds_its_agent_back_through_the_gateway_and_nothing_is_lost(
        monkeypatch: Any) -> None:
    window = WINDOW_MESSAGES * request_weight(b"x" * MESSAGE)
    monkeypatch.setattr(relay, "REQUEST_TAKEN_TOLD_BYTES", 2 * request_weight(b"x" * MESSAGE))
    reading = asyncio.Event()
    got: list[bytes] = []
    peak_waiting = [0]
    put = RelayedRequests.put

    def counted(self: RelayedRequests, data: bytes) -> None:
        put(self, data)
        peak_waiting[0] = max(peak_waiting[0], self.arrivals.waiting_bytes)

    monkeypatch.setattr(RelayedRequests, "put", counted)

    async def connect(requests: Any, context: Any) -> AsyncIterator[bytes]:
        await reading.wait()  # its Hello waits its turn (a join storm's), then it reads slowly
        async for data in requests:
            got.append(data)
            await asyncio.sleep(0.001)
        yield b"done"

    servicer = RelayServicer(linger_s=0.001)
    servicer.handlers = {CONNECT: grpc.stream_stream_rpc_method_handler(connect)}
    controller = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(servicer, controller)
    link_port = controller.add_insecure_port("127.0.0.1:0")
    await controller.start()
    gateway = Gateway("gateway-0", linger_s=0.001)
    gateway.request_window_bytes = window
    link_channel = aio.insecure_channel(f"127.0.0.1:{link_port}", options=LINK_OPTIONS)
    link = asyncio.create_task(gateway.run_link(link_channel))
    agents = aio.server(options=limits.GRPC_MESSAGE_OPTIONS)
    agents.add_generic_rpc_handlers((gateway.handlers(),))
    agent_port = agents.add_insecure_port("127.0.0.1:0")
    await agents.start()
    channel = aio.insecure_channel(f"127.0.0.1:{agent_port}")
    peak_ahead = [0]

    async def watch() -> None:
        while True:
            peak_ahead[0] = max([peak_ahead[0], *(p.requests_ahead for p in gateway._calls.values())])
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(_until(lambda: gateway.linked), 5)
        call = channel.stream_stream(CONNECT)()
        written = [0]
        sent = [b"%06d" % i + b"x" * (MESSAGE - 6) for i in range(MESSAGES)]

        async def write() -> None:
            for data in sent:
                await call.write(data)
                written[0] += 1
            await call.done_writing()

        writer = asyncio.create_task(write())
        await asyncio.wait_for(_settled(lambda: written[0]), 20)
        assert not writer.done() and written[0] < MESSAGES  # the agent's send blocks
        reading.set()
        assert await asyncio.wait_for(call.read(), 30) == b"done"
        assert await call.code() == grpc.StatusCode.OK
        await writer
        assert got == sent  # nothing lost or reordered
        # Ahead of what was taken: below the window, then the one message read last.
        assert peak_ahead[0] <= window + request_weight(sent[0])
        assert 0 < peak_waiting[0] <= (WINDOW_MESSAGES + 1) * MESSAGE
    finally:
        watcher.cancel()
        await channel.close()
        await agents.stop(None)
        link.cancel()
        await link_channel.close()
        await controller.stop(None)


def test_the_overhead_a_request_counts_for() -> None:
    assert request_weight(b"") == REQUEST_OVERHEAD_BYTES
