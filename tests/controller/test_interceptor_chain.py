"""The interceptor chain builds a method's handler once (`BuiltOncePerMethod`), not per call; a
streaming call crosses one generator for every level of it (`_LeveledStream`)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc import aio

from controller import errors
from controller.api.interceptors import BuiltOncePerMethod, MalformedRequest, _BehaviourInterceptor, _LeveledStream
from controller.gcpolicy import YOUNG_THRESHOLD, configure_gc


class _Counting(aio.ServerInterceptor):
    """Wraps the inner handler (a new one per build, like the real interceptors) and counts builds."""

    def __init__(self, built: list[str]) -> None:
        self.built = built

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.built.append(details.method)
        inner = await continuation(details)
        if inner is None:
            return None
        return grpc.unary_unary_rpc_method_handler(inner.unary_unary)


async def _echo(request: Any, context: Any) -> Any:
    return request


async def test_a_methods_handler_is_built_by_its_first_call_and_served_to_every_later_one() -> None:
    outer, inner = [], []
    chain = BuiltOncePerMethod([_Counting(outer), _Counting(inner)])
    registered = {"/maia.v1.S/A": grpc.unary_unary_rpc_method_handler(_echo),
                  "/maia.v1.S/B": grpc.unary_unary_rpc_method_handler(_echo)}
    found: list[str] = []

    async def continuation(details: Any) -> Any:
        found.append(details.method)
        return registered.get(details.method)

    first = await chain.intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/A"))
    again = [await chain.intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/A")) for _ in range(3)]
    other = await chain.intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/B"))
    assert first is not None and all(h is first for h in again)
    assert other is not None and other is not first
    assert outer == inner == found == ["/maia.v1.S/A", "/maia.v1.S/B"]  # both levels ran, in order, once each
    assert await first.unary_unary("ping", None) == "ping"  # the built handler reaches the method's own


async def test_an_unknown_method_is_never_remembered() -> None:
    built: list[str] = []
    chain = BuiltOncePerMethod([_Counting(built)])

    async def continuation(details: Any) -> Any:
        return None

    for _ in range(3):
        assert await chain.intercept_service(continuation, SimpleNamespace(method="/no.Such/Method")) is None
    assert built == ["/no.Such/Method"] * 3
    assert chain._handlers == {}


def test_the_collector_thresholds_are_raised_for_long_running_processes() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        configure_gc()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD > 700
    finally:
        gc.set_threshold(*before)


# --- streamed responses: every level in one generator a call ---------------------------------

class _Level(_BehaviourInterceptor):
    """A level that records its scope's entry and exit, and what failure crossed it."""

    def __init__(self, name: str, said: list[str], *, guard: bool = False) -> None:
        self.name = name
        self.said = said
        self.guard_requests = guard

    @asynccontextmanager
    async def scope(self, method: str, context: Any, *, stream: bool) -> AsyncIterator[None]:
        self.said.append(f"enter {self.name} stream={stream}")
        try:
            yield
        except errors.MaiaError as exc:
            self.said.append(f"failed {self.name}: {exc.message}")
            raise
        finally:
            self.said.append(f"exit {self.name}")


class _Wrapping(aio.ServerInterceptor):
    """Not a level: wraps a streaming handler in a generator of its own (as the node certificate
    check does)."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        inner = await continuation(details)
        behaviour = inner.stream_stream

        async def wrapped(requests: Any, context: Any) -> AsyncIterator[Any]:
            async for item in behaviour(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(wrapped, request_deserializer=inner.request_deserializer)


async def _echo_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield f"echo {request}"


async def _words(request: Any, context: Any) -> AsyncIterator[Any]:
    for word in request.split():
        yield word


async def _requests(*items: Any) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def _built(interceptors: list[aio.ServerInterceptor], registered: grpc.RpcMethodHandler) -> Any:
    async def continuation(details: Any) -> Any:
        return registered

    return await BuiltOncePerMethod(interceptors).intercept_service(continuation, SimpleNamespace(method="/maia.v1.S/M"))


async def test_a_streaming_call_crosses_one_generator_for_every_level_of_the_chain() -> None:
    said: list[str] = []
    levels = [_Level("auth", said), _Level("log", said), _Level("errors", said, guard=True)]
    handler = await _built(levels, grpc.stream_stream_rpc_method_handler(_echo_stream, request_deserializer=bytes.decode))
    leveled = handler.stream_stream.__self__
    assert isinstance(leveled, _LeveledStream)
    assert leveled.levels == tuple(levels) and leveled.behaviour is _echo_stream  # joined, outermost first
    assert handler.request_deserializer(b"\xff") == MalformedRequest("UnicodeDecodeError")  # the guard's parser
    replies = [reply async for reply in handler.stream_stream(_requests("a", "b"), None)]
    assert replies == ["echo a", "echo b"]
    assert said == ["enter auth stream=True", "enter log stream=True", "enter errors stream=True",
                    "exit errors", "exit log", "exit auth"]


async def test_a_malformed_message_in_a_stream_fails_it_inside_every_levels_scope() -> None:
    said: list[str] = []
    levels = [_Level("auth", said), _Level("errors", said, guard=True)]
    handler = await _built(levels, grpc.stream_stream_rpc_method_handler(_echo_stream))
    replies: list[Any] = []
    with pytest.raises(errors.InvalidArgument, match="not a valid protobuf message of its type \\(DecodeError\\)"):
        async for reply in handler.stream_stream(_requests("a", MalformedRequest("DecodeError"), "c"), None):
            replies.append(reply)
    assert replies == ["echo a"]  # what came before it was served; nothing after it
    assert [s for s in said if s.startswith("failed")] == [
        "failed errors: the request is not a valid protobuf message of its type (DecodeError)",
        "failed auth: the request is not a valid protobuf message of its type (DecodeError)"]


async def test_a_malformed_request_of_a_server_stream_is_refused_inside_the_guarding_levels_scope_only() -> None:
    said: list[str] = []
    levels = [_Level("auth", said), _Level("errors", said, guard=True), _Level("inner", said)]
    handler = await _built(levels, grpc.unary_stream_rpc_method_handler(_words))
    assert [w async for w in handler.unary_stream("x y", None)] == ["x", "y"]
    said.clear()
    with pytest.raises(errors.InvalidArgument):
        async for _ in handler.unary_stream(MalformedRequest("DecodeError"), None):
            pass
    # The check runs where a level of its own put it: after the guarding level's scope is entered,
    # before the levels inside it are.
    assert said == ["enter auth stream=True", "enter errors stream=True",
                    "failed errors: the request is not a valid protobuf message of its type (DecodeError)",
                    "exit errors",
                    "failed auth: the request is not a valid protobuf message of its type (DecodeError)",
                    "exit auth"]


async def test_a_level_outside_an_interceptor_that_wraps_the_stream_wraps_that_one_not_the_servicer() -> None:
    said: list[str] = []
    outer, inner = _Level("outer", said), _Level("inner", said)
    handler = await _built([outer, _Wrapping(), inner], grpc.stream_stream_rpc_method_handler(_echo_stream))
    leveled = handler.stream_stream.__self__
    assert leveled.levels == (outer,) and leveled.behaviour is not _echo_stream
    assert [reply async for reply in handler.stream_stream(_requests("a"), None)] == ["echo a"]
    assert said == ["enter outer stream=True", "enter inner stream=True", "exit inner", "exit outer"]
