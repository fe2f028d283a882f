"""The relay's own pings on a gateway's link (controller/gateway/frames.py: `RelayEvent.ping`,
answered `pong` by the gateway's event loop): HTTP/2's keepalive pings are answered by gRPC's core
even while a process's loop is stuck, so a gateway (or a controller) stuck so kept its link.

A wait is lost only past its timeout at two judgements in a row (the link's reader had a turn
between), the controller ends the link of a gateway that does not answer (`link_lost`), a gateway
whose controller stops pinging gives its link up, and pings and answers go ahead of the data waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from controller import limits
from controller.domain.liveness import LivenessPolicy
from controller.gateway import children
from controller.gateway.frames import (
    GATEWAY_METADATA_KEY, GATEWAY_PID_METADATA_KEY, LINK_CALL, LINK_OPTIONS, LinkPings, Outbox, PingsHeard, PingTimes,
    late, link_ping_times, link_server_options, ping_event, pong_event,
)
from controller.gateway.process import Gateway
from controller.gateway.relay import PINGS_UNANSWERED, RelayServicer
from maia.v1 import relay_pb2, relay_pb2_grpc

TIMEOUT_S = 10.0
# Short enough for a test, long enough that a loaded host's loop answers in time.
QUICK = PingTimes(interval_s=0.25, timeout_s=1.0)


# --- the times ---------------------------------------------------------------------------------
def test_the_ping_times_come_from_the_keepalive_both_ends_are_given() -> None:
    assert link_ping_times() == link_ping_times(limits.AGENT_KEEPALIVE) == PingTimes(2.5, 10.0)
    short = limits.Keepalive(500, 500, 500, 500, 250)  # a loop's pauses are no stuck loop: 5 s at least
    assert link_ping_times(short) == PingTimes(1.25, 5.0)


def test_a_stuck_gateway_is_found_and_started_again_before_its_nodes_would_be_down() -> None:
    times = link_ping_times()
    found_s = times.timeout_s + 2 * times.interval_s  # the second judgement past the timeout, at the latest
    # Killed after the stuck grace whatever the streams it holds (the stop's grace grows to
    # STOP_GRACE_MAX_S, 20 s, with them: 12.5-15 s + 20 s was past the down grace).
    back_s = found_s + children.STUCK_GRACE_S + children.GatewaySettings(1, "", 5.0).restart_after_s
    assert back_s < LivenessPolicy().down_grace_s


# --- the controller's judgement -----------------------------------------------------------------
def test_pings_answered_in_time_never_lose_the_link() -> None:
    pings = LinkPings(TIMEOUT_S)
    now = 0.0
    for _ in range(100):
        number = pings.send(now)
        assert not pings.lost(now)
        now += 2.5
        pings.answered(number)
    assert pings.waited_s(now) == 0.0


def test_an_unanswered_ping_loses_the_link_once_it_waited_the_timeout_at_two_judgements_in_a_row() -> None:
    pings = LinkPings(TIMEOUT_S)
    pings.send(0.0)
    assert not pings.lost(5.0)
    assert not pings.lost(9.99)
    assert not pings.lost(TIMEOUT_S)  # reached once: the reader may not have had its turn yet
    assert pings.lost(12.5)


def test_an_answer_read_after_this_loop_stalled_keeps_the_link() -> None:
    """This loop stalled 30 s: the answer came meanwhile, unread when the next judgement runs."""
    pings = LinkPings(TIMEOUT_S)
    number = pings.send(0.0)
    assert not pings.lost(30.0)  # past the timeout, once
    pings.answered(number)  # the reader's turn
    pings.send(30.0)
    assert not pings.lost(30.1)
    assert not pings.lost(32.6)


def test_a_judge_whose_own_turn_came_late_gives_no_verdict_and_counts_its_next_as_a_first() -> None:
    """The controller's loop lagged (its turn half an interval late or more, at every turn a
    verdict before): the pong may wait unread, so a healthy gateway is not judged by it."""
    assert not late(None, 0.0, 2.5) and not late(10.0, 11.2, 2.5) and late(10.0, 11.25, 2.5)
    pings = LinkPings(TIMEOUT_S)
    pings.send(0.0)
    assert not pings.lost(TIMEOUT_S)  # reached once
    pings.excused()  # the next turn came late: no verdict
    assert not pings.lost(20.0)  # a first again
    assert pings.lost(22.5)  # still unanswered a turn on time later: lost
    heard = PingsHeard(TIMEOUT_S, now=0.0)
    assert not heard.lost(TIMEOUT_S)
    heard.excused()
    assert not heard.lost(20.0) and heard.lost(22.5)


def test_no_ping_is_counted_once_the_links_outbox_is_closed() -> None:
    from controller.gateway.relay import _Link

    outbox = Outbox(linger_s=0.001)
    link = _Link("gateway-0", {}, outbox, TIMEOUT_S)
    link.ping(0.0)
    assert link.pings.waited_s(1.0) == 1.0
    link.pings.answered(1)
    outbox.close()
    link.ping(2.0)  # the link ending: nothing sent, nothing to wait for
    assert link.pings.waited_s(30.0) == 0.0


def test_an_answer_answers_every_ping_up_to_its_number() -> None:
    pings = LinkPings(TIMEOUT_S)
    first, second, third = pings.send(0.0), pings.send(1.0), pings.send(2.0)
    assert (first, second, third) == (1, 2, 3) and pings.waited_s(3.0) == 3.0
    pings.answered(second)
    assert pings.waited_s(3.0) == 1.0  # the third waits
    pings.answered(first)  # late, out of order: nothing more
    assert pings.waited_s(3.0) == 1.0
    pings.answered(third)
    assert pings.waited_s(3.0) == 0.0


# --- the gateway's judgement --------------------------------------------------------------------
def test_a_gateway_gives_its_link_up_once_no_ping_came_for_the_timeout_at_two_judgements_in_a_row() -> None:
    heard = PingsHeard(TIMEOUT_S, now=100.0)  # the link's start counts as a ping heard
    assert not heard.lost(105.0) and not heard.lost(109.9)
    heard.heard(109.9)
    assert not heard.lost(120.5)  # reached once
    heard.heard(120.6)  # the pings queued while this loop stalled, read now
    assert not heard.lost(121.0)
    assert not heard.lost(130.6) and heard.lost(131.1)
    assert heard.silent_s(131.1) == pytest.approx(10.5)


# --- the outbox ---------------------------------------------------------------------------------
async def test_a_ping_goes_ahead_of_the_events_waiting_whatever_the_bounds_and_the_linger() -> None:
    outbox = Outbox(linger_s=60.0, bytes_max=1, events_max=1)
    outbox.message(1, b"a")
    outbox.message(2, b"b")
    assert outbox.over_bound
    outbox.add_first(ping_event(7))
    frames = outbox.frames()
    frame = await asyncio.wait_for(anext(frames), 5)  # not after the linger: at once
    assert [(e.call, e.WhichOneof("body")) for e in frame.events] == [(LINK_CALL, "ping"), (1, "message"),
                                                                      (2, "message")]
    assert frame.events[0].ping == 7
    outbox.close()
    outbox.add_first(pong_event(8))  # nothing after the close
    assert [f async for f in frames] == []


# --- both ends over a real link -------------------------------------------------------------------
async def _relay_server(servicer: relay_pb2_grpc.AgentRelayServicer) -> tuple[aio.Server, str]:
    server = aio.server(options=link_server_options())
    relay_pb2_grpc.add_AgentRelayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_the_controller_ends_the_link_of_a_gateway_that_answers_no_ping_and_tells_link_lost() -> None:
    """A gateway whose loop reads nothing and answers nothing (its transport still up: here a
    client that never sends a frame)."""
    servicer = RelayServicer(0.001, QUICK)
    lost: list[tuple[int | None, int, bool]] = []
    servicer.link_lost = lambda pid, calls, stuck: lost.append((pid, calls, stuck))
    server, address = await _relay_server(servicer)
    channel = aio.insecure_channel(address, options=LINK_OPTIONS)
    mute = asyncio.Event()

    async def nothing() -> AsyncIterator[relay_pb2.RelayFrame]:
        await mute.wait()
        yield relay_pb2.RelayFrame()

    try:
        call = relay_pb2_grpc.AgentRelayStub(channel).Relay(
            nothing(), metadata=((GATEWAY_METADATA_KEY, "mute"), (GATEWAY_PID_METADATA_KEY, "4242")))
        pinged: list[int] = []
        began = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(10):
                async for frame in call:
                    pinged += [e.ping for e in frame.events if e.WhichOneof("body") == "ping"]
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and ended.value.details() == PINGS_UNANSWERED
        assert asyncio.get_running_loop().time() - began >= QUICK.timeout_s
        assert pinged[:3] == [1, 2, 3]
        await asyncio.wait_for(_until(lambda: bool(lost)), 5)
        assert lost == [(4242, 0, True)] and not servicer.links  # lost to its pings: killed after the stuck grace
    finally:
        mute.set()
        await channel.close()
        await server.stop(None)


async def test_a_gateway_that_answers_keeps_its_link() -> None:
    servicer = RelayServicer(0.001, QUICK)
    lost: list[Any] = []
    servicer.link_lost = lambda pid, calls, stuck: lost.append(pid)
    server, address = await _relay_server(servicer)
    channel = aio.insecure_channel(address, options=LINK_OPTIONS)
    gateway = Gateway("gateway-0", linger_s=0.001, pings=QUICK)
    link = asyncio.create_task(gateway.run_link(channel))
    try:
        await asyncio.sleep(4 * QUICK.timeout_s)
        assert not lost and not link.done() and gateway.linked and not gateway.controller_silent
        [relayed] = servicer.links.values()
        assert relayed.pings.waited_s(asyncio.get_running_loop().time()) < QUICK.timeout_s
    finally:
        link.cancel()
        await channel.close()
        await server.stop(None)


class _Mute(relay_pb2_grpc.AgentRelayServicer):
    """A controller's end of the link whose loop sends nothing: no ping."""

    async def Relay(self, request_iterator: Any, context: Any) -> AsyncIterator[relay_pb2.RelayFrame]:
        async for _ in request_iterator:
            pass
        return
        yield


async def test_a_gateway_whose_controller_sends_no_ping_gives_its_link_up() -> None:
    server, address = await _relay_server(_Mute())
    channel = aio.insecure_channel(address, options=LINK_OPTIONS)
    gateway = Gateway("gateway-0", linger_s=0.001, pings=QUICK)
    try:
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(gateway.run_link(channel), 10)
        assert asyncio.get_running_loop().time() - began >= QUICK.timeout_s
        assert gateway.controller_silent and not gateway.linked and not gateway.ended_by_controller
    finally:
        await channel.close()
        await server.stop(None)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)
