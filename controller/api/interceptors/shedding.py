"""Load shedding: calls refused before the rest of the chain runs (the package docstring).

Why a module of its own: `LoadShedInterceptor` is not a level of the chain built once per method
(`chain.BuiltOncePerMethod`) but stands outside it, asked per call before any request is parsed,
so a refusal in a join storm costs one rule and one status; it shares only `status.abort_with`
with the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from controller import errors
from controller.api.interceptors.status import abort_with

log = logging.getLogger("maia.api")


SHED_LOG_EVERY_S = 10.0

# A method's shedding rule: the refusal for a call with this much time left (None: no deadline),
# or None to serve it.
ShedRule = Callable[[float | None], errors.MaiaError | None]


class LoadShedInterceptor(aio.ServerInterceptor):
    """Refuses calls of the given methods before anything else runs when their rule says so (the
    package docstring). The rule is asked with the call's deadline; the rest of the chain is built
    only for a call that is served (its request parsed then), so a refusal costs one rule and one
    status. `on_shed(method)` counts each refusal."""

    def __init__(self, rules: dict[str, ShedRule], on_shed: Callable[[str], None] | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rules = rules
        self._on_shed = on_shed
        self._clock = clock
        self._serializers: dict[str, tuple[Any, Any]] = {}  # method -> (request deserializer, response serializer)
        self._shed_since_log = 0
        self._logged_at = -math.inf
        self.shed = 0
        self._all: errors.MaiaError | None = None  # while set, every call is refused with it (`refuse_all`)

    def refuse_all(self, refusal: errors.MaiaError | None) -> None:
        """Refuse every call of any method with `refusal` (a controller serving while it starts:
        its schema checked, its tokens read), or, with None, serve by the rules again."""
        self._all = refusal

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if self._all is not None:
            return _refusing(await continuation(details), self._all)
        rule = self._rules.get(details.method)
        if rule is None:
            return await continuation(details)
        if details.method not in self._serializers:  # the first call: learn the method's serializers
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler
            self._serializers[details.method] = (handler.request_deserializer, handler.response_serializer)
            return self._guarded(rule, details, handler=handler, continuation=continuation)
        return self._guarded(rule, details, handler=None, continuation=continuation)

    def _guarded(self, rule: ShedRule, details: grpc.HandlerCallDetails, *, handler: Any,
                 continuation: Any) -> grpc.RpcMethodHandler:
        deserialize, serialize = self._serializers[details.method]

        async def shed_or_serve(raw: bytes, context: aio.ServicerContext) -> Any:
            refusal = rule(context.time_remaining())
            if refusal is not None:
                self._count(details.method)
                await abort_with(context, refusal)
            inner = handler if handler is not None else await continuation(details)
            return await inner.unary_unary(deserialize(raw) if deserialize is not None else raw, context)

        return grpc.unary_unary_rpc_method_handler(shed_or_serve, request_deserializer=None,
                                                   response_serializer=serialize)

    def _count(self, method: str) -> None:
        self.shed += 1
        self._shed_since_log += 1
        if self._on_shed is not None:
            self._on_shed(method)
        now = self._clock()
        if now - self._logged_at >= SHED_LOG_EVERY_S:
            log.warning("load shedding: %d call(s) refused busy before authentication since the last such line "
                        "(one at most every %.0fs), the last to %s", self._shed_since_log, SHED_LOG_EVERY_S, method)
            self._logged_at, self._shed_since_log = now, 0


def _refusing(handler: grpc.RpcMethodHandler | None, refusal: errors.MaiaError) -> grpc.RpcMethodHandler | None:
    """A handler of `handler`'s kind that ends each call with `refusal`, its request unread."""
    if handler is None:
        return None

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        await abort_with(context, refusal)

    async def refuse_streamed(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        await abort_with(context, refusal)  # raises: nothing is yielded
        yield

    for kind, factory, behaviour in (("unary_unary", grpc.unary_unary_rpc_method_handler, refuse),
                                     ("stream_unary", grpc.stream_unary_rpc_method_handler, refuse),
                                     ("unary_stream", grpc.unary_stream_rpc_method_handler, refuse_streamed),
                                     ("stream_stream", grpc.stream_stream_rpc_method_handler, refuse_streamed)):
        if getattr(handler, kind) is not None:
            return factory(behaviour, request_deserializer=None, response_serializer=handler.response_serializer)
    return handler
