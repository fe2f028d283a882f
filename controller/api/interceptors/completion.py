"""Completion observers: the levels that see each RPC begin and end (metrics, the log line).

Why a module of its own: metrics and logging share one shape (`_CompletionInterceptor`: `began`
once when a call starts, `completed` once when it ends, with the status code it ended with,
`code_of`, also the audit's) and read what a call carries besides its request (the caller,
`_who`; when it was sent, `sent_at`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from grpc import aio

from controller.api.targets import describe_target
from controller.api.interceptors.behaviour import Behaviour, _BehaviourInterceptor
from controller.domain.values import deployment_key
from controller.identity import peek_principal

log = logging.getLogger("maia.api")
# A call cancelled this close to its deadline ended by it: the caller's side gives up at its own
# clock's deadline, which the server's (counted from the call's arrival) reaches a moment later
# (CI saw CANCELLED with 0.1 ms of a 200 ms deadline left).
DEADLINE_SLACK_S = 0.05


def code_of(context: aio.ServicerContext, failed: BaseException | None) -> str:
    """The status code name an RPC ended with: the code its context holds (an abort's, the error
    translation's, a handler's own), else what its end says. gRPC cancels a handler's task when
    the call ends under it (its peer went away: a killed node, a dropped connection, a client's
    cancel; or its deadline passed): CANCELLED, or DEADLINE_EXCEEDED when no time was left. An
    exception no level translated is answered UNKNOWN by gRPC itself: so it is counted."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None:
        return code.name if hasattr(code, "name") else str(code)
    if failed is None:
        return "OK"
    if isinstance(failed, (asyncio.CancelledError, GeneratorExit)):
        left = context.time_remaining() if hasattr(context, "time_remaining") else None
        return "DEADLINE_EXCEEDED" if left is not None and left <= DEADLINE_SLACK_S else "CANCELLED"
    return "UNKNOWN"


def _who() -> str:
    who = peek_principal()
    if who is None:
        return "principal=- (no token needed)"
    return f"principal={who.name} role={who.role.value} request_id={who.request_id or '-'}"


class RpcObserver(Protocol):
    def rpc_handled(self, full_method: str, code: str, seconds: float | None) -> None:
        """A call ended with `code` after `seconds`; None for a stream's, whose life (a watch, an
        agent's Connect: hours) is no call's duration."""

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
            self.completed(method, context, started, exc, request)
            raise
        self.completed(method, context, started, None, request)
        return response

    def began(self, method: str, context: aio.ServicerContext, *, stream: bool) -> float:
        """The RPC's start (perf_counter)."""
        if stream:
            self.stream_opened(method)
        return time.perf_counter()

    def stream_opened(self, method: str) -> None:
        pass

    def completed(self, method: str, context: aio.ServicerContext, started: float,
                  failed: BaseException | None, request: Any = None) -> None:
        """`request`: a unary call's (None for a stream's)."""
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
                  failed: BaseException | None, request: Any = None) -> None:
        # A stream's (no `request`) is counted, not timed: its hours all fell in the histogram's
        # +Inf, and the dashboard's p99 read the top bucket's bound (10 s) for each streaming method.
        seconds = None if request is None else time.perf_counter() - started
        self._observer.rpc_handled(method, code_of(context, failed), seconds)


# The level a finished call's line is logged at, by its status code (`LoggingInterceptor`).
# - INFO: what the caller asked for and was told, as designed: its own mistake (INVALID_ARGUMENT,
#   OUT_OF_RANGE, UNIMPLEMENTED), an outcome it probes for or retries (NOT_FOUND: `maiactl apply`
#   asks GetDeployment whether each deployment exists; ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED,
#   RESOURCE_EXHAUSTED: a quota, a rate limit, told when to retry), or it went away (CANCELLED: a
#   node killed or flapping drops its stream). Each is counted in `maia_grpc_server_handled_total`
#   by its code; one big apply made thousands of WARNING lines of them, burying the few that matter.
# - WARNING: who may not call (UNAUTHENTICATED, PERMISSION_DENIED: a security team reads them), and
#   the controller not serving in time (UNAVAILABLE: its database failed, it is starting, it does
#   not lead; DEADLINE_EXCEEDED: the caller stopped waiting for it).
# - ERROR: the controller's own fault (INTERNAL, UNKNOWN, DATA_LOSS; INTERNAL's traceback is logged
#   where it is translated, `status.internal_error`; UNKNOWN's, untranslated, with its line).
# A code not named here (none is today) is logged at WARNING.
AGENT_STREAM = "/maia.v1.NodeAgentService/Connect"  # a node agent's stream (api/agents.py)
LOG_LEVEL_BY_CODE: dict[str, int] = {
    "OK": logging.INFO,
    **dict.fromkeys(("CANCELLED", "INVALID_ARGUMENT", "OUT_OF_RANGE", "UNIMPLEMENTED", "NOT_FOUND",
                     "ALREADY_EXISTS", "FAILED_PRECONDITION", "ABORTED", "RESOURCE_EXHAUSTED"), logging.INFO),
    **dict.fromkeys(("UNAUTHENTICATED", "PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED"), logging.WARNING),
    **dict.fromkeys(("INTERNAL", "UNKNOWN", "DATA_LOSS"), logging.ERROR),
}


class LoggingInterceptor(_CompletionInterceptor):
    """One line per finished call, at the level of its status code (`LOG_LEVEL_BY_CODE`); health
    checks and watches that end well at DEBUG (a watch per console tab, a check per probe)."""

    def stream_opened(self, method: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc stream opened method=%s %s", method, _who())

    def completed(self, method: str, context: aio.ServicerContext, started: float,
                  failed: BaseException | None, request: Any = None) -> None:
        code = code_of(context, failed)
        level = LOG_LEVEL_BY_CODE.get(code, logging.WARNING)
        if code == "OK" and method.endswith(("/Check", "/Watch")):
            level = logging.DEBUG
        elif code == "UNAVAILABLE" and method == AGENT_STREAM:
            # The controller ends agents' streams so itself (stopping, stepping down, an agent gone
            # silent), logged once where it decides (the hub, the node's suspect line): a line an
            # agent at WARNING was one per node at every shutdown.
            level = logging.INFO
        if not log.isEnabledFor(level):  # the line's fields are not worked out for nothing
            return
        untranslated = failed if code == "UNKNOWN" and isinstance(failed, Exception) else None
        log.log(level, "rpc method=%s %s%s code=%s ms=%.1f", method, _who(), _object(method, request), code,
                (time.perf_counter() - started) * 1000, exc_info=untranslated)


def _object(method: str, request: Any) -> str:
    """' object=KIND/ID' of what a unary call names (its request's name, id or node id, a
    deployment's as TENANT/NAME where the request says the tenant), or '' (a list, a stream)."""
    if request is None:
        return ""
    kind, object_id, tenant = describe_target(method, request)
    if not object_id:
        return ""
    if kind == "deployment" and tenant:
        object_id = deployment_key(tenant, object_id)
    said = object_id[:128]
    return f" object={kind}/{said}" if said.isprintable() and " " not in said else f" object={kind}/{said!r}"
