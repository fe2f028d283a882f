"""Authentication: the level that verifies a call's bearer token and sets its caller's principal.

Why a module of its own: it is the chain's first level (the principal is set before metrics and
logging read it) and the only level that knows `controller.authn` and sets `controller.identity`'s
principal; the methods that need no token (health checking, reflection) are named here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from grpc import aio

from controller import errors, limits
from controller.api.interceptors.behaviour import Behaviour, _BehaviourInterceptor
from controller.api.interceptors.status import (DATABASE_FAILED_RETRY_MS, abort_with,
                                                 database_unavailable_before_the_call)
from controller.authn import Authenticator
from controller.identity import Principal, reset_principal, set_principal
from controller.ratelimit import Sampler
from controller.store.db import database_failed

log = logging.getLogger("maia.api")


# Services anyone may call without a token: health checking (load balancers, probes) and reflection.
UNAUTHENTICATED_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class AuthenticationInterceptor(_BehaviourInterceptor):
    """Sets the caller's principal, or refuses the call UNAUTHENTICATED (telling `on_refused`:
    method, the operator's reason, peer; the audit's `UnauthenticatedAuditor`). A refusal is
    logged with its reason for the operator (`Unauthenticated.why`), at most at `lines`' rate: a
    token-guessing flood must not flood the log (the line after a gap says how many were left out).
    A database that failed the token's read is UNAVAILABLE, logged at the same bounded rate."""

    def __init__(self, authenticator: Authenticator,
                 on_refused: Callable[[str, str, str], Awaitable[None]] | None = None,
                 lines: Sampler | None = None, database_retry_ms: Callable[[], int] | None = None) -> None:
        self._authenticator = authenticator
        self._database_retry_ms = database_retry_ms or (lambda: DATABASE_FAILED_RETRY_MS)  # as `ErrorInterceptor`'s
        self._on_refused = on_refused
        self._lines = lines or Sampler(limits.UNAUTHENTICATED_LINES_PER_MINUTE, limits.UNAUTHENTICATED_LINES_BURST)
        # Every agent and client meets a database outage at its token's read: a line a caller would
        # be thousands a minute (the line after a gap says how many were left out).
        self._outage_lines = Sampler(limits.UNAUTHENTICATED_LINES_PER_MINUTE, limits.UNAUTHENTICATED_LINES_BURST)

    async def _principal(self, method: str, context: aio.ServicerContext) -> Principal | None:
        """The caller's principal (None: a method that needs no token); a refusal ends the call.

        A token not verified lately is read from the database. When the database cannot be read
        (an outage, a connection lost) the call is UNAVAILABLE with a retry time, as it would be
        further in (`ErrorInterceptor`, which this level is in front of): not gRPC's UNKNOWN and a
        traceback, which told maiactl's watches and the agents to give up rather than retry."""
        if method.startswith(UNAUTHENTICATED_SERVICE_PREFIXES):
            return None
        try:
            return await self._authenticator.authenticate(context.invocation_metadata())
        except errors.Unauthenticated as exc:
            left_out = self._lines.sample()
            if left_out is not None:
                log.warning("rpc method=%s code=UNAUTHENTICATED reason=%s peer=%s%s", method, exc.why,
                            context.peer(), f" suppressed={left_out}" if left_out else "")
            if self._on_refused is not None:
                await self._on_refused(method, exc.why, context.peer())
            await abort_with(context, exc)
            raise  # not reached: the abort raises
        except Exception as exc:
            if not database_failed(exc):
                raise
            left_out = self._outage_lines.sample()
            if left_out is not None:
                log.warning("the database failed verifying the caller of %s (%s: %s); the caller is told "
                            "UNAVAILABLE%s", method, type(exc).__name__, exc,
                            f" (suppressed={left_out})" if left_out else "")
            await abort_with(context, database_unavailable_before_the_call(method, exc, self._database_retry_ms()))
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
