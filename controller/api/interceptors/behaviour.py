"""How an interceptor of the chain wraps a method's handler, and the base class every level
but the load shedding derives from.

Why a module of its own: the wrapping (a unary call's coroutine per level, a streaming call's
levels joined in one generator, `_LeveledStream`) and the tolerant request parsing (a request
that does not parse refused INVALID_ARGUMENT inside a level's scope, `MalformedRequest`) are the
same for every level; each concern's module (`authentication`, `completion`, `status`) only says
what its level does around a call (`scope`, `around`).

Each interceptor is one async context manager (`scope`) entered around a streaming method
handler's behaviour (a streaming call enters every level's scope in one generator,
`_LeveledStream`, not a generator a level), and one coroutine (`around`) awaited around a unary
one: an async context manager is an async generator, which the event loop registers and forgets
again (a weak set), and entering and leaving five of them was most of the chain's cost on every
unary call. Both share each interceptor's steps (`_principal`, `began`/`completed`, `_translated`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from controller import errors
from controller.aio import PushedStream, pushed


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """What a request that does not parse as its message type is handed on as (never UNKNOWN)."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or anything else a parser raises on bad bytes
            return MalformedRequest(type(exc).__name__)
    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise errors.InvalidArgument(f"the request is not a valid protobuf message of its type ({request.error})")
    return request


def _parsed_stream(requests: Any) -> Any:
    """`requests`, each checked by `_parsed` as it is taken (read, or pushed: `_ParsedPushes`)."""
    source = pushed(requests)
    return _parsed_reads(requests) if source is None else _ParsedPushes(source)


async def _parsed_reads(requests: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parsed(request)


class _ParsedPushes:
    """A stream that pushes its requests (`controller.aio.PushedStream`: a relayed one), each
    checked by `_parsed` whether read or pushed; a refusal ends the pushing as it ends a read."""

    __slots__ = ("_requests",)

    def __init__(self, requests: PushedStream) -> None:
        self._requests = requests  # its own iterator

    def __aiter__(self) -> _ParsedPushes:
        return self

    async def __anext__(self) -> Any:
        return _parsed(await anext(self._requests))

    def push_to(self, take: Callable[[Any], None], ended: Callable[[BaseException | None], None]) -> Callable[[], None]:
        return self._requests.push_to(lambda request: take(_parsed(request)), ended)


# A unary method handler's behaviour: (request, context) -> its response.
Behaviour = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str,
                  around_unary: Callable[[str, Behaviour, Any, aio.ServicerContext], Awaitable[Any]],
                  *, guard_requests: bool = False) -> grpc.RpcMethodHandler:
    """Rebuild `handler` with its behaviour awaited inside `around_unary` (unary responses, and
    streaming handlers written with `await context.write()`; streamed responses: `_LeveledStream`).

    With `guard_requests`, a request that does not parse reaches the behaviour as a
    `MalformedRequest` and is refused there with INVALID_ARGUMENT (inside the wrapping scope).
    """
    if handler is None:
        return handler
    deserializer = handler.request_deserializer
    if guard_requests:
        deserializer = _tolerant(deserializer)
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, factory in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is None:
            continue
        if guard_requests:
            behaviour = _guarded(behaviour, _parsed_stream if attr.startswith("stream_") else _parsed)

        # One coroutine per level: `around_unary` itself (no wrapper coroutine, no closure per call).
        return factory(functools.partial(around_unary, method, behaviour), request_deserializer=deserializer,
                       response_serializer=handler.response_serializer)
    return handler


def _guarded(behaviour: Any, check: Callable[[Any], Any]) -> Any:
    """`behaviour` with its request (or request stream) passed through `check` first: a plain
    function that returns the behaviour's coroutine (no coroutine of its own to run per call).
    The level around it calls it inside its scope, so a refusal `check` raises is that level's."""
    def guarded(request: Any, context: aio.ServicerContext) -> Any:
        return behaviour(check(request), context)
    return guarded


def _streamed_behaviour(handler: grpc.RpcMethodHandler | None) -> Any:
    """The handler's behaviour if it streams its responses as an async generator (else None)."""
    if handler is None:
        return None
    behaviour = handler.stream_stream or handler.unary_stream
    return behaviour if inspect.isasyncgenfunction(behaviour) else None


class _LeveledStream:
    """A streaming call wrapped by every `_BehaviourInterceptor` around its handler at once.

    One async generator a call (`serve`) enters the levels' scopes, outermost first, passes the
    requests through the check of a level that guards them (inside that level's scope, as a level
    of its own would) and yields the behaviour's responses. A level wrapping a handler that the
    level inside it built this way joins its levels instead of adding a generator around it: a
    response crosses one generator whatever the chain's length, and a stream holds one generator,
    not two a level and a lambda (with the hub's changes, 22.2 -> 16.9 KiB of Python memory an
    agent stream: docs/benchmarks.md, `agentmsg`)."""

    __slots__ = ("method", "behaviour", "levels", "streams_in")

    def __init__(self, method: str, behaviour: Any, levels: tuple[_BehaviourInterceptor, ...],
                 streams_in: bool) -> None:
        self.method = method
        self.behaviour = behaviour
        self.levels = levels
        self.streams_in = streams_in

    @classmethod
    def around(cls, level: _BehaviourInterceptor, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` (streaming its responses) wrapped by `level` too."""
        behaviour = _streamed_behaviour(handler)
        streams_in = handler.stream_stream is not None
        inner = getattr(behaviour, "__self__", None)
        if isinstance(inner, cls):  # the level inside built it: join it
            leveled = cls(method, inner.behaviour, (level, *inner.levels), streams_in)
        else:
            leveled = cls(method, behaviour, (level,), streams_in)
        deserializer = handler.request_deserializer
        if level.guard_requests:
            deserializer = _tolerant(deserializer)
        factory = grpc.stream_stream_rpc_method_handler if streams_in else grpc.unary_stream_rpc_method_handler
        return factory(leveled.serve, request_deserializer=deserializer,
                       response_serializer=handler.response_serializer)

    async def serve(self, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        async with AsyncExitStack() as scopes:
            for level in self.levels:
                await scopes.enter_async_context(level.scope(self.method, context, stream=True))
                if level.guard_requests:
                    request = _parsed_stream(request) if self.streams_in else _parsed(request)
            async for item in self.behaviour(request, context):
                yield item


class _BehaviourInterceptor(aio.ServerInterceptor):
    """Base: subclasses implement `scope`, entered around one RPC's behaviour, unary or streamed."""

    guard_requests = False  # refuse unparsable requests inside this interceptor's scope

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if _streamed_behaviour(handler) is not None:
            return _LeveledStream.around(self, handler_call_details.method, handler)
        return _wrap_handler(handler, handler_call_details.method, self.around, guard_requests=self.guard_requests)

    def scope(self, method: str, context: aio.ServicerContext, *, stream: bool) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def around(self, method: str, behaviour: Behaviour, request: Any, context: aio.ServicerContext) -> Any:
        """One unary call: `behaviour(request, context)` within this interceptor's duty (by default
        within `scope`; the interceptors every call meets do it without one: the module docstring)."""
        async with self.scope(method, context, stream=False):
            return await behaviour(request, context)
