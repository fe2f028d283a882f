"""Calls the controller asked to be made again are made again, transparently, and only those.

The controller marks an answer "nothing of this call was written; call again after this pause"
with a `google.rpc.RetryInfo` detail (`controller.retryinfo`): a transaction the database rolled
back for a concurrent one (a deadlock's victim, a serialization failure: ABORTED), a tenant over
its rate or a controller busy with others (RESOURCE_EXHAUSTED, UNAVAILABLE). `RetryTold`, a client
interceptor on maiactl's channel (`client.open_channel`), and `AioRetryTold`, its twin for asyncio
channels (`client.open_aio_channel`), send such a unary call again after the pause told, stretched
at random (so clients told the same pause do not come back together), up to
`RetryPolicy.max_attempts` attempts, within the call's own timeout (each attempt gets what is left
of it). Both ask one `CallRetries` per call what to do after a failed attempt, so the rule lives
in one place. It never retries on a status code alone: an ABORTED without RetryInfo (a stale
resource_version) is a conflict only a new read resolves (`maiactl scale` reads again), and an
answer whose write may have landed carries no RetryInfo. A pause longer than `max_wait_s` (a
tenant's submit rate) is not waited out: the caller gets the answer, which says when. Nor is a
pause after which too little of the call's timeout would be left for a real attempt
(`RetryPolicy.min_attempt_s`, or as long as the last attempt took if longer): that attempt would
end DEADLINE_EXCEEDED, hiding the controller's answer, which the caller gets instead.

Making a write again is safe because the answer says nothing of it was written; the submits and
updates of `maiactl apply` carry a `client_request_id` besides (one per run), so even a write that
had landed would be answered its first result rather than written twice. Streams (watches) are
not retried here, nor is a call made with `.future()` on a blocking channel: its caller holds a
future that must not wait for the call (nor for any pause), so it gets the first attempt's as it
is (one whose answer came before the interceptor looked, already ended, is treated as a blocking
call). An asyncio call is retried inside the call object its caller awaits: cancelling it cancels the
attempt under way (on the wire: the controller stops serving it) or the pause.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from controller.retryinfo import told_retry_s

log = logging.getLogger("maiactl.retry")

Metadata = Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How far a client follows the controller's "call again after": at most `max_attempts`
    attempts of one call, a told pause stretched by up to `jitter` of itself, no pause longer
    than `max_wait_s` (a longer one is reported, not waited out), and no attempt given less of
    the call's timeout than `min_attempt_s` or the time the last attempt took, whichever is
    longer (an attempt that cannot finish in time would only turn the answer into
    DEADLINE_EXCEEDED). `min_attempt_s` is a loopback round trip with the controller's work and
    some margin; the last attempt's time covers a slow link or a controller that took long to say
    no (an admission queue waited in), since the next attempt meets the same."""

    max_attempts: int = 5
    max_wait_s: float = 2.0
    jitter: float = 0.25
    min_attempt_s: float = 0.1

    def pause_s(self, told_s: float, attempts: int, time_left_s: float | None, last_attempt_s: float,
                rng: random.Random) -> float | None:
        """The pause before the next attempt after `attempts` attempts, the last of which took
        `last_attempt_s` and was told to wait `told_s`, with `time_left_s` of the call's timeout
        left (None: no timeout); None: give up (the caller gets that last answer)."""
        if attempts >= self.max_attempts or told_s > self.max_wait_s:
            return None
        pause = min(self.max_wait_s, told_s * rng.uniform(1.0, 1.0 + self.jitter))
        if time_left_s is not None and time_left_s - pause < max(self.min_attempt_s, last_attempt_s):
            return None  # too little time left for another attempt: the answer as it is
        return pause


@dataclass
class CallRetries:
    """One call's attempts under a policy: each interceptor starts an attempt with `attempt` (its
    timeout: what is left of the call's) and, when it fails, asks `pause_after` whether and when
    to make the next."""

    policy: RetryPolicy
    rng: random.Random
    clock: Callable[[], float]
    deadline: float | None  # the clock's time the call's timeout ends (None: no timeout)
    attempts: int = 0
    started: float = 0.0  # when the last attempt started

    def attempt(self) -> float | None:
        """Starts an attempt; its timeout (None: the call has none)."""
        self.attempts += 1
        self.started = self.clock()
        return None if self.deadline is None else max(0.0, self.deadline - self.started)

    def pause_after(self, trailing_metadata: Metadata | None) -> float | None:
        """The pause before the next attempt after the last one failed with this trailer, or None:
        the failure is the caller's (no RetryInfo, a pause too long, no attempt or time left)."""
        told = told_retry_s(trailing_metadata)
        if told is None:
            return None
        now = self.clock()
        time_left = None if self.deadline is None else self.deadline - now
        return self.policy.pause_s(told, self.attempts, time_left, now - self.started, self.rng)

    def note(self, method: str | bytes, code: grpc.StatusCode, message: str | None, pause: float) -> None:
        log.debug("%s: %s (%s); attempt %d in %.2fs", method, code.name, message, self.attempts + 1, pause)


@dataclass
class _Retries:
    """What both interceptors hold: the policy, the jitter's randomness and the clock."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic

    def _retries(self, timeout: float | None) -> CallRetries:
        return CallRetries(self.policy, self.rng, self.clock, None if timeout is None else self.clock() + timeout)


class CallDetails(
        namedtuple("CallDetails", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails):
    """A call's details changed by an interceptor (grpc wants a ClientCallDetails back)."""


@dataclass
class RetryTold(_Retries, grpc.UnaryUnaryClientInterceptor):
    """Retries a blocking unary call whose failure carries RetryInfo (module docstring)."""

    sleep: Callable[[float], None] = time.sleep

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                              details: grpc.ClientCallDetails, request: Any) -> Any:
        retries = self._retries(details.timeout)
        while True:
            timeout = retries.attempt()
            if timeout is not None and retries.attempts > 1:
                details = CallDetails(details.method, timeout, details.metadata, details.credentials,
                                      details.wait_for_ready, details.compression)
            outcome = continuation(details, request)
            if not outcome.done():  # `.future()` (a blocking call's outcome has ended): not waited for here
                return outcome
            error = outcome.exception()
            if error is None:
                return outcome
            pause = retries.pause_after(error.trailing_metadata() if isinstance(error, grpc.Call) else None)
            if pause is None:
                return outcome
            retries.note(details.method, error.code(), error.details(), pause)  # type: ignore[attr-defined]
            self.sleep(pause)


@dataclass
class AioRetryTold(_Retries, aio.UnaryUnaryClientInterceptor):
    """Retries an asyncio unary call whose failure carries RetryInfo (module docstring)."""

    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def intercept_unary_unary(self, continuation: Callable[[aio.ClientCallDetails, Any], Any],
                                    details: aio.ClientCallDetails, request: Any) -> Any:
        retries = self._retries(details.timeout)
        while True:
            timeout = retries.attempt()
            if timeout is not None and retries.attempts > 1:
                details = aio.ClientCallDetails(details.method, timeout, details.metadata, details.credentials,
                                                details.wait_for_ready)
            call = await continuation(details, request)
            try:
                code = await call.code()
            except asyncio.CancelledError:  # the caller's call cancelled: this attempt too (grpc
                call.cancel()  # cancels only the task running us, the attempt would go on unseen)
                raise
            if code == grpc.StatusCode.OK:
                return call
            pause = retries.pause_after(await call.trailing_metadata())
            if pause is None:
                return call  # awaited by the caller, it raises the answer's error
            retries.note(details.method, code, await call.details(), pause)
            await self.sleep(pause)
