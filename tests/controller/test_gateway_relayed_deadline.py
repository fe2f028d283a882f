"""An agent call's deadline across a gateway (`process.Gateway._open`): its time left goes to the
controller in `RelayOpen.timeout_s`, where 0 means no deadline; so a call whose deadline already
passed is answered DEADLINE_EXCEEDED by the gateway and never relayed (relayed with 0 s left, it
ran in the controller with no deadline at all)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controller.gateway.process import Gateway
from controller.gateway.relay import RelayedContext
from maia.v1 import relay_pb2


class Aborted(Exception):
    pass


class AgentCall:
    """What the gateway reads of an agent's call (a `grpc.aio.ServicerContext`'s part)."""

    def __init__(self, time_left: float | None) -> None:
        self.time_left = time_left
        self.status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self.time_left

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer t"),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.status = (code, details)
        raise Aborted(code.name)


def linked_gateway() -> Gateway:
    gateway = Gateway("gateway-0", linger_s=0.0)
    gateway.linked = True
    return gateway


async def relayed_opens(gateway: Gateway) -> list[relay_pb2.RelayOpen]:
    """The openings the gateway queued for the controller so far."""
    gateway.outbox.close()
    frames = [frame async for frame in gateway.outbox.frames()]
    return [event.open for frame in frames for event in frame.events if event.WhichOneof("body") == "open"]


async def no_requests() -> AsyncIterator[bytes]:
    await asyncio.sleep(3600)
    yield b""


async def call(gateway: Gateway, method: str, agent: AgentCall) -> asyncio.Task[Any]:
    if method == "Register":
        task: asyncio.Task[Any] = asyncio.create_task(gateway.register(b"request", agent))  # type: ignore[arg-type]
    else:
        task = asyncio.create_task(anext(gateway.connect(no_requests(), agent)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    return task


@pytest.mark.parametrize("method", ["Register", "Connect"])
async def test_a_call_whose_deadline_passed_is_answered_deadline_exceeded_and_not_relayed(method: str) -> None:
    gateway = linked_gateway()
    agent = AgentCall(time_left=0.0)  # gRPC's time_remaining() once the deadline passed
    task = await call(gateway, method, agent)
    assert task.done()
    with pytest.raises(Aborted):
        task.result()
    assert agent.status is not None and agent.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gateway.open_calls() == 0
    assert await relayed_opens(gateway) == []


@pytest.mark.parametrize("method", ["Register", "Connect"])
@pytest.mark.parametrize("time_left", [None, 0.002, 7.5])
async def test_a_calls_time_left_reaches_the_controller_as_its_own_deadline(
        method: str, time_left: float | None) -> None:
    gateway = linked_gateway()
    task = await call(gateway, method, AgentCall(time_left))
    try:
        [opened] = await relayed_opens(gateway)
    finally:
        task.cancel()
    assert opened.method == f"/maia.v1.NodeAgentService/{method}"
    left = RelayedContext(opened, gateway.name).time_remaining()
    if time_left is None:
        assert opened.timeout_s == 0.0 and left is None  # no deadline: none in the controller either
    else:
        assert opened.timeout_s == time_left and left is not None and left <= time_left


async def test_a_call_while_the_link_is_down_is_answered_unavailable() -> None:
    gateway = Gateway("gateway-0", linger_s=0.0)
    agent = AgentCall(time_left=5.0)
    task = await call(gateway, "Register", agent)
    with pytest.raises(Aborted):
        task.result()
    assert agent.status is not None and agent.status[0] == grpc.StatusCode.UNAVAILABLE
