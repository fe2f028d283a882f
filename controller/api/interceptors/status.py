"""Error translation: the one place where `controller.errors` become gRPC status codes.

Why a module of its own: the chain's last level (`ErrorInterceptor`) and everything else that
answers a caller with an error's status (the load shedding's and the authentication's refusals,
`abort_with`; a SubmitDeployments result per refused request, `status_of`; the audit's status
code, `status_for`) must say the same thing the same way: the code, the capped message, the
structured reasons (`maia-reason-bin`), the rich error with RetryInfo.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from controller import errors, limits
from controller.api.interceptors.behaviour import Behaviour, _BehaviourInterceptor
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
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


MAX_REASONS = 16
# Methods that only read: named by these verbs (`reads_only`; the audit leaves them out too).
READ_ONLY_VERBS = ("Get", "List", "Watch", "Verify", "Check")
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

    def __init__(self, database_retry_ms: Callable[[], int] | None = None) -> None:
        # The pause a caller the database failed is told (`FailureRun.retry_after_ms`: it grows
        # with the outage); DATABASE_FAILED_RETRY_MS without one.
        self._database_retry_ms = database_retry_ms or (lambda: DATABASE_FAILED_RETRY_MS)

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

    async def _translated(self, method: str, context: aio.ServicerContext, exc: Exception) -> None:
        """End the call with the status `exc` stands for (an abort further in stands as it is)."""
        if isinstance(exc, aio.AbortError):
            raise exc
        known = as_maia_error(method, exc, retry_after_ms=self._database_retry_ms())
        if known is not None:
            await abort_with(context, known)
        else:
            message = internal_error(method, exc)
            await context.abort(grpc.StatusCode.INTERNAL, message, trailing_metadata=(
                (STATUS_DETAILS_METADATA_KEY, error_status(grpc.StatusCode.INTERNAL, message)),))


def as_maia_error(method: str, exc: BaseException, *, logged: bool = True,
                  retry_after_ms: int = DATABASE_FAILED_RETRY_MS) -> errors.MaiaError | None:
    """The error a caller is told for `exc` raised while serving `method` (the class docstring of
    `ErrorInterceptor`), or None for an unexpected one (INTERNAL: `internal_error`). `logged`:
    the translation of a database's failure is logged (False: the audit's outcome, the same
    answer read again); `retry_after_ms`: the pause it is told."""
    if isinstance(exc, errors.MaiaError):
        return exc
    if database_failed(exc):
        return _database_unavailable(method, exc, logged=logged, retry_after_ms=retry_after_ms)
    if (why := transaction_aborted(exc)) is not None:
        return _transaction_aborted(method, why, exc, logged=logged)
    return None


def internal_error(method: str, exc: Exception) -> str:
    """Log an unexpected error with its traceback; the short message its caller is told (INTERNAL)."""
    log.exception("unexpected error in %s", method, exc_info=exc)
    return f"internal error ({type(exc).__name__}); see the controller log"


def reads_only(method: str) -> bool:
    """Whether `method` (a full gRPC method name) only reads: a Get, List, Watch, Verify or Check."""
    return method.rpartition("/")[2].startswith(READ_ONLY_VERBS)


def _database_unavailable(method: str, exc: BaseException, *, logged: bool = True,
                          retry_after_ms: int = DATABASE_FAILED_RETRY_MS) -> errors.Unavailable:
    """What a caller is told when the database failed under its call: retry soon, and read first
    (the call's writes may have landed: a COMMIT whose answer was lost cannot be told apart from
    one that never arrived); a call that only reads is told to call again as it is."""
    if logged:
        log.warning("the database failed during %s; the caller is told UNAVAILABLE", method, exc_info=exc)
    if reads_only(method):
        return errors.Unavailable(f"the controller's database failed during the call ({type(exc).__name__}); "
                                  f"it only reads: retry it", retry_after_ms=retry_after_ms)
    return errors.Unavailable(f"the controller's database failed during the call ({type(exc).__name__}); "
                              f"what it wrote may have landed: read before retrying it",
                              retry_after_ms=retry_after_ms, may_have_landed=True)


def database_unavailable_before_the_call(method: str, exc: Exception,
                                         retry_after_ms: int = DATABASE_FAILED_RETRY_MS) -> errors.Unavailable:
    """What a caller is told when the database failed before its call began (the read that verifies
    its token, in front of every other level): nothing was done, so call again as it is (RetryInfo).
    Logged by the caller (`AuthenticationInterceptor`, at a bounded rate: every agent meets it)."""
    return errors.Unavailable(f"the controller's database could not be read to verify the caller's token "
                              f"({type(exc).__name__}); nothing was done: retry the call",
                              retry_after_ms=retry_after_ms)


def _transaction_aborted(method: str, why: str, exc: BaseException, *, logged: bool = True) -> errors.Conflict:
    """What a caller is told when the database rolled back the call's transaction for what another
    did (`db.transaction_aborted`): ABORTED, retry soon; nothing of that transaction landed."""
    if logged:
        log.warning("the database aborted a transaction of %s (%s); the caller is told ABORTED", method, why,
                    exc_info=exc)
    return errors.Conflict(f"the controller's database aborted the call's transaction ({why}): nothing of it "
                           f"was written; retry the call", retry_after_ms=TRANSACTION_ABORTED_RETRY_MS)
