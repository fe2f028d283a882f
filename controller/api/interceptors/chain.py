"""The chain's assembly: which levels, in which order, each method's handler built once.

Why a module of its own: the order of the levels is a decision of its own (the principal set
before metrics and logging read it, errors translated around the audit), and building a
method's handler once (`BuiltOncePerMethod`) holds for every level alike; the server
(`controller.api.server`) asks `interceptor_chain` for its chain, giving it the load shedding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from controller.api.interceptors.authentication import AuthenticationInterceptor
from controller.api.interceptors.completion import LoggingInterceptor, MetricsInterceptor, RpcObserver
from controller.api.interceptors.shedding import LoadShedInterceptor
from controller.api.interceptors.status import ErrorInterceptor
from controller.authn import Authenticator


class BuiltOncePerMethod(aio.ServerInterceptor):
    """Runs `interceptors` (outermost first) for a method's first call and serves every later call
    of that method the handler they built, without running them again.

    Every interceptor of the controller builds its handler from the method's name and its inner
    handler alone (what varies per call, the metadata, the peer, the deadline, is read inside the
    handler, from the call's context), so the handler a method's first call built is the one every
    call would build. Rebuilding it per call (one handler and a closure per interceptor, an await per
    level) cost about as much CPU as the rest of a unary call's gRPC work. Only methods that have a
    handler are remembered (unknown names are answered UNIMPLEMENTED by gRPC and never stored), so
    the cache holds at most one entry per served method."""

    def __init__(self, interceptors: list[aio.ServerInterceptor]) -> None:
        self.interceptors = tuple(interceptors)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = self._handlers.get(details.method)
        if handler is None:
            handler = await self._build(0, continuation, details)
            if handler is not None:
                self._handlers[details.method] = handler
        return handler

    async def _build(self, level: int, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if level == len(self.interceptors):
            return await continuation(details)
        return await self.interceptors[level].intercept_service(
            lambda inner: self._build(level + 1, continuation, inner), details)


def interceptor_chain(authenticator: Authenticator, *extra: aio.ServerInterceptor,
                      observer: RpcObserver | None = None,
                      on_refused: Callable[[str, str, str], Awaitable[None]] | None = None,
                      shed: LoadShedInterceptor | None = None,
                      database_retry_ms: Callable[[], int] | None = None,
                      ) -> list[aio.ServerInterceptor]:
    """Outermost first: load shedding (when given) before anything; the principal is set before
    metrics and logging read it; they see the translated status code; errors are translated around
    `extra` (the audit interceptor), which so sees a failure before its status is sent. All but the
    load shedding build a method's handler once (`BuiltOncePerMethod`): `extra` must build theirs
    from the method and the inner handler alone, like the others. `database_retry_ms`: the pause
    a caller the database failed is told (`FailureRun.retry_after_ms`)."""
    metrics = [MetricsInterceptor(observer)] if observer is not None else []
    chain = BuiltOncePerMethod([AuthenticationInterceptor(authenticator, on_refused,
                                                          database_retry_ms=database_retry_ms), *metrics,
                                LoggingInterceptor(), ErrorInterceptor(database_retry_ms), *extra])
    return [*([shed] if shed is not None else []), chain]
