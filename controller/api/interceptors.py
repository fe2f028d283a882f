"""The one interceptor chain every RPC goes through: (load shedding ->) authentication -> metrics ->
logging -> error translation.

- load shedding (`LoadShedInterceptor`, outermost, for the methods it is given: agent Registers):
  a call the controller would refuse anyway for want of room (a join storm) is refused first,
  UNAVAILABLE with a retry time (`retry-after-ms` and google.rpc.RetryInfo), before its request is
  parsed and before any other interceptor runs: no token check, no audit entry, no log line of
  its own (a summary line every `SHED_LOG_EVERY_S`), counted in `maia_grpc_server_shed`. In a
  4,096-node join storm the refusals, each through the whole chain, took the event loop from the
  writes that would have let the agents in. While the controller starts (`refuse_all`: its
  schema checked, its tokens read) every call is refused there the same way, so a client
  meets "starting, call again" with a retry time, not a port that accepts and never answers;

- authentication: the bearer token in the metadata verified (`controller.authn`) and the
  caller's `Principal` (with the call's request id) put into a context variable; a call that
  fails is answered UNAUTHENTICATED here, before any servicer runs. Health checking and
  reflection need no token;
- metrics: each finished RPC counted by method and status code, with its duration (the
  `RpcObserver` given, the controller's metrics);
- logging: one structured line per RPC (method, principal, role, request id, status, milliseconds);
- errors: the only place where `controller.errors` become gRPC status codes, with the error's
  message verbatim and its structured reasons in trailing metadata (`maia-reason-bin`); anything unexpected becomes INTERNAL with a short message and is logged
  with its traceback.

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
import math
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from controller import errors, limits
from controller.aio import PushedStream, pushed
from controller.authn import Authenticator
from controller.identity import Principal, peek_principal, reset_principal, set_principal
from controller.ratelimit import RETRY_AFTER_METADATA_KEY
from controller.retryinfo import STATUS_DETAILS_METADATA_KEY, error_status, rich_error
from controller.store.db import database_failed, transaction_aborted
from maia.v1 import common_pb2

log = logging.getLogger("maia.api")

# Trailing metadata key of the structured reasons of an error (binary: serialized maia.v1.Reason).
REASON_METADATA_KEY = "maia-reason-bin"

STATUS_BY_ERROR: dict[type[errors.MaiaError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


MAX_REASONS = 16
DATABASE_FAILED_RETRY_MS = 1000  # the pool replaces a lost connection at the next unit of work
TRANSACTION_ABORTED_RETRY_MS = 100  # the transaction it waited for has ended (a deadlock's other side)


def capped(message: str, limit: int = limits.ERROR_MESSAGE_MAX) -> str:
    """An error message cut to `limit` characters (it may quote many caller-supplied ids)."""
    if len(message) <= limit:
        return message
    tail = f"... ({len(message) - limit} more characters)"
    return message[:limit - len(tail)] + tail


def status_for(error: errors.MaiaError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.UNKNOWN


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


SHED_LOG_EVERY_S = 10.0

# A method's shedding rule: the refusal for a call with this much time left (None: no deadline),
# or None to serve it.
ShedRule = Callable[[float | None], errors.MaiaError | None]


class LoadShedInterceptor(aio.ServerInterceptor):
    """Refuses calls of the given methods before anything else runs when their rule says so (the
    module docstring). The rule is asked with the call's deadline; the rest of the chain is built
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


# Services anyone may call without a token: health checking (load balancers, probes) and reflection.
UNAUTHENTICATED_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class AuthenticationInterceptor(_BehaviourInterceptor):
    """Sets the caller's principal, or refuses the call UNAUTHENTICATED (telling `on_refused`:
    method, reason, peer; the audit's `UnauthenticatedAuditor`)."""

    def __init__(self, authenticator: Authenticator,
                 on_refused: Callable[[str, str, str], Awaitable[None]] | None = None) -> None:
        self._authenticator = authenticator
        self._on_refused = on_refused

    async def _principal(self, method: str, context: aio.ServicerContext) -> Principal | None:
        """The caller's principal (None: a method that needs no token); a refusal ends the call."""
        if method.startswith(UNAUTHENTICATED_SERVICE_PREFIXES):
            return None
        try:
            return await self._authenticator.authenticate(context.invocation_metadata())
        except errors.Unauthenticated as exc:
            log.warning("rpc method=%s code=UNAUTHENTICATED reason=%s peer=%s", method, exc.message, context.peer())
            if self._on_refused is not None:
                await self._on_refused(method, exc.message, context.peer())
            await abort_with(context, exc)
            raise  # not reached: the abort raises

    @asynccontextmanager
    async def scope(self, method: str, context: aio.ServicerContext, *, stream: bool) -> AsyncIterator[None]:
        principal = await self._principal(method, context)
        if principal is None:
            yield
            return
        token = set_principal(principal)
        try:
            yield
        finally:
            try:
                reset_principal(token)
            except ValueError:  # a stream's generator finalised in another context
                pass

    async def around(self, method: str, behaviour: Behaviour, request: Any, context: aio.ServicerContext) -> Any:
        principal = await self._principal(method, context)
        if principal is None:
            return await behaviour(request, context)
        token = set_principal(principal)
        try:
            return await behaviour(request, context)
        finally:
            reset_principal(token)


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


async def abort_with(context: aio.ServicerContext, exc: errors.MaiaError) -> None:
    """End the call with the error's status and message; structured reasons travel as trailing
    metadata, one serialized maia.v1.Reason per entry. Every answer carries the standard rich
    error (a google.rpc.Status: clients tell by it that the controller answered,
    `controller.retryinfo`), with RetryInfo ("call again as it is") when nothing was written and
    a retry time is given."""
    trailing = tuple(
        (REASON_METADATA_KEY, reason.SerializeToString()) for reason in _reason_msgs(exc)
    ) + tuple(exc.metadata)
    code, message = status_for(exc), capped(exc.message)
    if exc.retry_after_ms is not None:  # for programs: when, plainly
        trailing += ((RETRY_AFTER_METADATA_KEY, str(exc.retry_after_ms)),)
    trailing += ((STATUS_DETAILS_METADATA_KEY, error_status(code, message, _retry_info_ms(exc),
                                                            _bad_request(exc.violations))),)
    await context.abort(code, message, trailing_metadata=trailing)


def status_of(exc: errors.MaiaError, field_prefix: str = "") -> status_pb2.Status:
    """The google.rpc.Status a call refused with `exc` carries, as one message: the code, the
    capped message, RetryInfo as `abort_with` gives it, google.rpc.BadRequest for the fields it
    names (each field's path after `field_prefix`: `requests[3].`), and a maia.v1.Reason per
    structured reason (a call's trailer sends those as `maia-reason-bin` entries instead). What a
    SubmitDeployments result answers for a request it refused."""
    violations = tuple(replace(v, field=field_prefix + v.field) for v in exc.violations)
    return rich_error(status_for(exc), capped(exc.message), _retry_info_ms(exc),
                      [*_bad_request(violations), *_reason_msgs(exc)])


def _retry_info_ms(exc: errors.MaiaError) -> int | None:
    """RetryInfo's pause: only when nothing was written (`retryinfo`)."""
    return exc.retry_after_ms if not exc.may_have_landed else None


def _reason_msgs(exc: errors.MaiaError) -> list[common_pb2.Reason]:
    return [common_pb2.Reason(code=r.code, message=capped(r.message), scope=capped(r.scope))
            for r in exc.reasons[:MAX_REASONS]]


def _bad_request(violations: tuple[errors.FieldViolation, ...]) -> list[error_details_pb2.BadRequest]:
    if not violations:
        return []
    return [error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=capped(v.field),
                                                    description=capped(v.description))
        for v in violations[:MAX_REASONS]])]


class ErrorInterceptor(_BehaviourInterceptor):
    """Translates the error hierarchy to status codes: the one place that does.

    It is also where malformed protobuf becomes INVALID_ARGUMENT, where a database that could not
    be reached or failed mid-call (`db.database_failed`: a connection lost, none in time) becomes
    UNAVAILABLE with a retry time rather than INTERNAL (`retry-after-ms` alone: its write may have
    landed, so no RetryInfo, `controller.retryinfo`), a transaction the database rolled back for
    what a concurrent one did (`db.transaction_aborted`: a deadlock's victim, a serialization
    failure) ABORTED with a retry time, and where every message is capped at
    `limits.ERROR_MESSAGE_MAX` characters."""

    guard_requests = True

    @asynccontextmanager
    async def scope(self, method: str, context: aio.ServicerContext, *, stream: bool) -> AsyncIterator[None]:
        try:
            yield
        except Exception as exc:
            await self._translated(method, context, exc)

    async def around(self, method: str, behaviour: Behaviour, request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except Exception as exc:
            await self._translated(method, context, exc)

    @staticmethod
    async def _translated(method: str, context: aio.ServicerContext, exc: Exception) -> None:
        """End the call with the status `exc` stands for (an abort further in stands as it is)."""
        if isinstance(exc, aio.AbortError):
            raise exc
        known = as_maia_error(method, exc)
        if known is not None:
            await abort_with(context, known)
        else:
            message = internal_error(method, exc)
            await context.abort(grpc.StatusCode.INTERNAL, message, trailing_metadata=(
                (STATUS_DETAILS_METADATA_KEY, error_status(grpc.StatusCode.INTERNAL, message)),))


def as_maia_error(method: str, exc: Exception) -> errors.MaiaError | None:
    """The error a caller is told for `exc` raised while serving `method` (the class docstring of
    `ErrorInterceptor`), or None for an unexpected one (INTERNAL: `internal_error`)."""
    if isinstance(exc, errors.MaiaError):
        return exc
    if database_failed(exc):
        return _database_unavailable(method, exc)
    if (why := transaction_aborted(exc)) is not None:
        return _transaction_aborted(method, why, exc)
    return None


def internal_error(method: str, exc: Exception) -> str:
    """Log an unexpected error with its traceback; the short message its caller is told (INTERNAL)."""
    log.exception("unexpected error in %s", method, exc_info=exc)
    return f"internal error ({type(exc).__name__}); see the controller log"


def _database_unavailable(method: str, exc: Exception) -> errors.Unavailable:
    """What a caller is told when the database failed under its call: retry soon, and read first
    (the call's writes may have landed: a COMMIT whose answer was lost cannot be told apart from
    one that never arrived)."""
    log.warning("the database failed during %s; the caller is told UNAVAILABLE", method, exc_info=exc)
    return errors.Unavailable(f"the controller's database failed during the call ({type(exc).__name__}); "
                              f"what it wrote may have landed: read before retrying it",
                              retry_after_ms=DATABASE_FAILED_RETRY_MS, may_have_landed=True)


def _transaction_aborted(method: str, why: str, exc: Exception) -> errors.Conflict:
    """What a caller is told when the database rolled back the call's transaction for what another
    did (`db.transaction_aborted`): ABORTED, retry soon; nothing of that transaction landed."""
    log.warning("the database aborted a transaction of %s (%s); the caller is told ABORTED", method, why,
                exc_info=exc)
    return errors.Conflict(f"the controller's database aborted the call's transaction ({why}): nothing of it "
                           f"was written; retry the call", retry_after_ms=TRANSACTION_ABORTED_RETRY_MS)


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
                      ) -> list[aio.ServerInterceptor]:
    """Outermost first: load shedding (when given) before anything; the principal is set before
    metrics and logging read it; they see the translated status code; errors are translated around
    `extra` (the audit interceptor), which so sees a failure before its status is sent. All but the
    load shedding build a method's handler once (`BuiltOncePerMethod`): `extra` must build theirs
    from the method and the inner handler alone, like the others."""
    metrics = [MetricsInterceptor(observer)] if observer is not None else []
    chain = BuiltOncePerMethod([AuthenticationInterceptor(authenticator, on_refused), *metrics,
                                LoggingInterceptor(), ErrorInterceptor(), *extra])
    return [*([shed] if shed is not None else []), chain]
