"""What the completion observers (`controller/api/interceptors/completion.py`) see of each way a
call ends, over a real socket: the code counted is the one the client was told (never a made-up
`ERROR`), and the line is logged at the level its code calls for (`LOG_LEVEL_BY_CODE`): a peer that
went away and a caller's expected refusals at INFO, who may not call and a controller that cannot
serve at WARNING, the controller's own faults at ERROR."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from controller import errors
from controller.api.interceptors import BuiltOncePerMethod, ErrorInterceptor
from controller.api.interceptors.completion import LoggingInterceptor, MetricsInterceptor, code_of
from controller.api.server import ControllerApp
from grpc_harness import HandAgent, Stubs, admin_token_of, running_controller, topology

SERVICE = "maia.v1.Probe"


class _Handled:
    """An `RpcObserver` that keeps each call's method and code."""

    def __init__(self) -> None:
        self.codes: dict[str, str] = {}
        self.seconds: dict[str, float | None] = {}

    def rpc_handled(self, full_method: str, code: str, seconds: float | None) -> None:
        self.seconds[full_method.rpartition("/")[2]] = seconds
        self.codes[full_method.rpartition("/")[2]] = code

    def rpc_queued(self, full_method: str, seconds: float) -> None:
        pass


def _raising(error: BaseException) -> Any:
    async def behaviour(request: bytes, context: aio.ServicerContext) -> bytes:
        raise error
    return behaviour


async def _slow(request: bytes, context: aio.ServicerContext) -> bytes:
    await asyncio.sleep(30)
    return request


async def _pushing(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
    """An agent stream's shape: the controller pushes, whatever the peer writes."""
    while True:
        yield b"set"
        await asyncio.sleep(0.02)


async def _echoing(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


def _unary(behaviour: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behaviour, bytes, bytes)


def _streaming(behaviour: Any) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(behaviour, bytes, bytes)


HANDLERS = {
    "Missing": _unary(_raising(errors.NotFound("deployment/web not found"))),
    "OverQuota": _unary(_raising(errors.ResourceExhausted("tenant lab: quota"))),
    "Invalid": _unary(_raising(errors.InvalidArgument("replicas: must be positive"))),
    "Forbidden": _unary(_raising(errors.PermissionDenied("a viewer may not submit"))),
    "Unavailable": _unary(_raising(errors.Unavailable("not the leader"))),
    "Broken": _unary(_raising(RuntimeError("a bug"))),
    "Slow": _unary(_slow),
    "Push": _streaming(_pushing),
    "Echo": _streaming(_echoing),
}


@pytest.fixture
async def served() -> AsyncIterator[tuple[aio.Channel, aio.Channel, _Handled]]:
    """Two servers: the chain's completion levels with the error translation inside them (as
    the controller has them), and without it (an exception no level translates)."""
    handled = _Handled()
    servers, channels = [], []
    for levels in ([MetricsInterceptor(handled), LoggingInterceptor(), ErrorInterceptor()],
                   [MetricsInterceptor(handled), LoggingInterceptor()]):
        server = aio.server(interceptors=[BuiltOncePerMethod(levels)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channels.append(aio.insecure_channel(f"127.0.0.1:{port}"))
    try:
        yield channels[0], channels[1], handled
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(None)


def _unary_call(channel: aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=bytes, response_deserializer=bytes)


def _stream_call(channel: aio.Channel, method: str) -> Any:
    return channel.stream_stream(f"/{SERVICE}/{method}", request_serializer=bytes, response_deserializer=bytes)()


async def _told(call: Any) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as refused:
        await call
    return refused.value.code()


def _line_of(caplog: pytest.LogCaptureFixture, method: str) -> logging.LogRecord:
    head = f"rpc method=/{SERVICE}/{method} "
    lines = [r for r in caplog.records if r.name == "maia.api" and r.getMessage().startswith(head)]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


async def _ended(handled: _Handled, method: str) -> str:
    """The code counted for `method` once its handler ended (a cancelled one ends after the client)."""
    for _ in range(200):
        if method in handled.codes:
            return handled.codes[method]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method} never completed: {handled.codes}")


async def test_a_stream_whose_peer_went_away_is_counted_cancelled_and_logged_at_info(
        served: tuple[aio.Channel, aio.Channel, _Handled], caplog: pytest.LogCaptureFixture) -> None:
    channel, _, handled = served
    caplog.set_level(logging.DEBUG, logger="maia.api")
    stream = _stream_call(channel, "Push")
    assert await stream.read() == b"set"
    stream.cancel()  # what a killed node's connection reset does to its stream, as the server sees it
    assert await _ended(handled, "Push") == "CANCELLED"
    assert _line_of(caplog, "Push").levelno == logging.INFO

    # A stream the peer closed well ends well.
    stream = _stream_call(channel, "Echo")
    await stream.write(b"hello")
    assert await stream.read() == b"hello"
    await stream.done_writing()
    assert await stream.read() is aio.EOF
    assert await _ended(handled, "Echo") == "OK"
    # A stream is counted, not timed: its life (a watch, an agent's Connect: hours) is no call's
    # duration, and every one fell in the duration histogram's +Inf (found in review).
    assert handled.seconds["Push"] is None and handled.seconds["Echo"] is None


async def test_a_call_past_its_deadline_is_counted_deadline_exceeded_at_warning(
        served: tuple[aio.Channel, aio.Channel, _Handled], caplog: pytest.LogCaptureFixture) -> None:
    channel, _, handled = served
    caplog.set_level(logging.DEBUG, logger="maia.api")
    assert await _told(_unary_call(channel, "Slow")(b"x", timeout=0.2)) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _ended(handled, "Slow") == "DEADLINE_EXCEEDED"
    assert (handled.seconds["Slow"] or 0) > 0.1  # a unary call is timed (the deadline's clock starts before ours)
    assert _line_of(caplog, "Slow").levelno == logging.WARNING


@pytest.mark.parametrize(("method", "code", "level"), [
    ("Missing", grpc.StatusCode.NOT_FOUND, logging.INFO),  # maiactl apply's existence probe
    ("OverQuota", grpc.StatusCode.RESOURCE_EXHAUSTED, logging.INFO),
    ("Invalid", grpc.StatusCode.INVALID_ARGUMENT, logging.INFO),
    ("Forbidden", grpc.StatusCode.PERMISSION_DENIED, logging.WARNING),
    ("Unavailable", grpc.StatusCode.UNAVAILABLE, logging.WARNING),
    ("Broken", grpc.StatusCode.INTERNAL, logging.ERROR),
])
async def test_a_refused_call_is_counted_with_its_code_and_logged_at_that_codes_level(
        served: tuple[aio.Channel, aio.Channel, _Handled], caplog: pytest.LogCaptureFixture,
        method: str, code: grpc.StatusCode, level: int) -> None:
    channel, _, handled = served
    caplog.set_level(logging.DEBUG, logger="maia.api")
    assert await _told(_unary_call(channel, method)(b"x")) == code
    assert await _ended(handled, method) == code.name
    assert _line_of(caplog, method).levelno == level


async def test_an_exception_no_level_translated_is_counted_unknown_as_grpc_answers_it(
        served: tuple[aio.Channel, aio.Channel, _Handled], caplog: pytest.LogCaptureFixture) -> None:
    _, untranslated, handled = served
    caplog.set_level(logging.DEBUG, logger="maia.api")
    assert await _told(_unary_call(untranslated, "Broken")(b"x")) == grpc.StatusCode.UNKNOWN
    assert await _ended(handled, "Broken") == "UNKNOWN"
    line = _line_of(caplog, "Broken")
    assert line.levelno == logging.ERROR and line.exc_info is not None  # its traceback, logged nowhere else


@asynccontextmanager
async def _an_agent_streaming(app: ControllerApp) -> AsyncIterator[Stubs]:
    """One node's agent registered and streaming (its first set received), on a channel of its
    own as a node has: that channel's stubs."""
    admin = Stubs.connect(app.address, admin_token_of(app))
    node = Stubs.connect(app.address, admin_token_of(app))
    agent = HandAgent(node, "node-1", "rack-a")
    try:
        await admin.admin.ApplyTopology(topology({"rack-a": "row-a"}))
        await agent.register()
        await agent.connect()
        await agent.next_set()
        yield node
    finally:
        await agent.close()
        await admin.channel.close()
        await node.channel.close()


def _connect_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("rpc method=/maia.v1.NodeAgentService/Connect ")]


async def test_an_agent_stream_dropped_by_its_node_is_counted_cancelled_and_logged_at_info(
        migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node killed (its connection reset) ends its Connect under the handler: CANCELLED, at INFO
    (an SRE killing and flapping nodes saw `code="ERROR"` and a WARNING line a stream)."""
    caplog.set_level(logging.DEBUG, logger="maia.api")
    async with running_controller(migrated_db_url, tmp_path, heartbeat_timeout_s=60) as app:
        handled = _Handled()
        app.metrics.rpc_handled = handled.rpc_handled  # type: ignore[method-assign]
        async with _an_agent_streaming(app) as node:
            await node.channel.close(grace=None)  # the node's process gone: its connection reset
            assert await _ended(handled, "Connect") == "CANCELLED"
    connect = _connect_lines(caplog)
    assert [r.levelno for r in connect] == [logging.INFO], [r.getMessage() for r in connect]


async def test_agent_streams_the_controller_ends_at_its_stop_are_logged_at_info(
        migrated_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At a clean stop the controller ends every agent's stream UNAVAILABLE (go to another
    controller): a WARNING line an agent, 63 of them at each SIGTERM of a 64-node fleet."""
    caplog.set_level(logging.DEBUG, logger="maia.api")
    async with running_controller(migrated_db_url, tmp_path, heartbeat_timeout_s=60) as app:
        async with _an_agent_streaming(app):
            await app.stop(grace_s=1.0)
    connect = _connect_lines(caplog)
    assert [(r.levelno, "code=UNAVAILABLE" in r.getMessage()) for r in connect] == [(logging.INFO, True)], \
        [r.getMessage() for r in connect]


class _Left:
    """A servicer context with `left` seconds of its deadline left and no code set."""

    def __init__(self, left: float | None) -> None:
        self.left = left

    def code(self) -> None:
        return None

    def time_remaining(self) -> float | None:
        return self.left


@pytest.mark.parametrize(("left", "code"), [(0.0, "DEADLINE_EXCEEDED"), (0.0001, "DEADLINE_EXCEEDED"),
                                            (-0.01, "DEADLINE_EXCEEDED"), (0.5, "CANCELLED"), (None, "CANCELLED")])
def test_a_call_cancelled_at_its_deadline_by_the_callers_clock_ends_deadline_exceeded(left, code) -> None:
    """The caller gives up at its clock's deadline, a moment before the server's (CI saw
    CANCELLED with 0.1 ms of 200 ms left); one cancelled with time left was cancelled."""
    assert code_of(_Left(left), asyncio.CancelledError()) == code
