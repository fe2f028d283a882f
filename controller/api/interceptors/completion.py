"""Completion observers: the levels that see each RPC begin and end (metrics, the log line).

Why a module of its own: metrics and logging share one shape (`_CompletionInterceptor`: `began`
once when a call starts, `completed` once when it ends, with the status code it ended with,
`code_of`, also the audit's) and read what a call carries besides its request (the caller,
`_who`; when it was sent, `sent_at`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from grpc import aio

from controller.api.interceptors.behaviour import Behaviour, _BehaviourInterceptor
from controller.identity import peek_principal

log = logging.getLogger("maia.api")


def code_of(context: aio.ServicerContext, failed: BaseException | None) -> str:
    """The status code name an RPC ended with (OK, or the code its failure set)."""
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "OK" if failed is None else "ERROR"
    return code.name if hasattr(code, "name") else str(code)


def _who() -> str:
    who = peek_principal()
    if who is None:
        return "principal=- (no token needed)"
    return f"principal={who.name} role={who.role.value} request_id={who.request_id or '-'}"


class RpcObserver(Protocol):
    def rpc_handled(self, full_method: str, code: str, seconds: float) -> None: ...

    def rpc_queued(self, full_method: str, seconds: float) -> None: ...


# A client may say when it sent a call (its Unix time in seconds, as text): the controller then
# observes the call's wait before its handler ran (the transport, gRPC's queue), which its handling
# time misses. The benchmarks' clients send it; one clock only (clamped at 0).
SENT_AT_METADATA_KEY = "maia-sent-at"


def sent_at(context: aio.ServicerContext) -> float | None:
    """The `SENT_AT_METADATA_KEY` time the call carries (None: none, or not a number)."""
    for key, value in context.invocation_metadata() or ():
        if key == SENT_AT_METADATA_KEY:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


class _CompletionInterceptor(_BehaviourInterceptor):
    """Base: `began` is called once per RPC when it starts, `completed` once when it ends, with its
    start time and failure."""

    @asynccontextmanager
    async def scope(self, method: str, context: aio.ServicerContext, *, stream: bool) -> AsyncIterator[None]:
        started = self.began(method, context, stream=stream)
        failed: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self.completed(method, context, started, failed)

    async def around(self, method: str, behaviour: Behaviour, request: Any, context: aio.ServicerContext) -> Any:
        started = self.began(method, context, stream=False)
        try:
            response = await behaviour(request, context)
        except BaseException as exc:
            self.completed(method, context, started, exc)
            raise
        self.completed(method, context, started, None)
        return response

    def began(self, method: str, context: aio.ServicerContext, *, stream: bool) -> float:
        """The RPC's start (perf_counter)."""
        if stream:
            self.stream_opened(method)
        return time.perf_counter()

    def stream_opened(self, method: str) -> None:
        pass

    def completed(self, method: str, context: aio.ServicerContext, started: float,
                  failed: BaseException | None) -> None:
        raise NotImplementedError


class MetricsInterceptor(_CompletionInterceptor):
    def __init__(self, observer: RpcObserver) -> None:
        self._observer = observer

    def began(self, method: str, context: aio.ServicerContext, *, stream: bool) -> float:
        sent = sent_at(context)
        if sent is not None:
            self._observer.rpc_queued(method, max(0.0, time.time() - sent))
        return super().began(method, context, stream=stream)

    def completed(self, method: str, context: aio.ServicerContext, started: float,
                  failed: BaseException | None) -> None:
        self._observer.rpc_handled(method, code_of(context, failed), time.perf_counter() - started)


class LoggingInterceptor(_CompletionInterceptor):
    def stream_opened(self, method: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc stream opened method=%s %s", method, _who())

    def completed(self, method: str, context: aio.ServicerContext, started: float,
                  failed: BaseException | None) -> None:
        level = logging.INFO if failed is None else logging.WARNING
        if method.endswith(("/Check", "/Watch")) and failed is None:
            level = logging.DEBUG
        if not log.isEnabledFor(level):  # the line's fields are not worked out for nothing
            return
        log.log(level, "rpc method=%s %s code=%s ms=%.1f", method, _who(), code_of(context, failed),
                (time.perf_counter() - started) * 1000)
