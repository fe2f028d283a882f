"""Calls the controller asked to be made again are made again, transparently, and only those.

The controller marks an answer "nothing of this call was written; call again after this pause"
with a `google.rpc.RetryInfo` detail (`controller.retryinfo`): a transaction the database rolled
back for a concurrent one (a deadlock's victim, a serialization failure: ABORTED), a tenant over
its rate or a controller busy with others (RESOURCE_EXHAUSTED, UNAVAILABLE). `RetryTold`, a client
interceptor on maiactl's channel (`client.open_channel`), sends such a unary call again after the
pause told, stretched at random (so clients told the same pause do not come back together), up to
`RetryPolicy.max_attempts` attempts, within the call's own timeout (each attempt gets what is left
of it). It never retries on a status code alone: an ABORTED without RetryInfo (a stale
resource_version) is a conflict only a new read resolves (`maiactl scale` reads again), and an
answer whose write may have landed carries no RetryInfo. A pause longer than `max_wait_s` (a
tenant's submit rate) is not waited out: the caller gets the answer, which says when.

Making a write again is safe because the answer says nothing of it was written; the submits and
updates of `maiactl apply` carry a `client_request_id` besides (one per run), so even a write that
had landed would be answered its first result rather than written twice. Streams (watches) are
not retried here, nor is a call made with `.future()`: its caller holds a future that must
not wait for the call (nor for any pause), so it gets the first attempt's as it is (one whose
answer came before the interceptor looked, already ended, is treated as a blocking call).
"""

from __future__ import annotations

import logging
import random
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from controller.retryinfo import told_retry_s

log = logging.getLogger("maiactl.retry")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How far a client follows the controller's "call again after": at most `max_attempts`
    attempts of one call, a told pause stretched by up to `jitter` of itself, and no pause
    longer than `max_wait_s` (a longer one is reported, not waited out)."""

    max_attempts: int = 5
    max_wait_s: float = 2.0
    jitter: float = 0.25

    def pause_s(self, told_s: float, attempts: int, time_left_s: float | None, rng: random.Random) -> float | None:
        """The pause before the next attempt after `attempts` attempts, the last told to wait
        `told_s`, with `time_left_s` of the call's timeout left (None: no timeout); None: give up."""
        if attempts >= self.max_attempts or told_s > self.max_wait_s:
            return None
        pause = min(self.max_wait_s, told_s * rng.uniform(1.0, 1.0 + self.jitter))
        if time_left_s is not None and pause >= time_left_s:
            return None  # no time left for another attempt: the answer as it is
        return pause


class CallDetails(
        namedtuple("CallDetails", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails):
    """A call's details changed by an interceptor (grpc wants a ClientCallDetails back)."""


@dataclass
class RetryTold(grpc.UnaryUnaryClientInterceptor):
    """Retries a unary call whose failure carries RetryInfo (module docstring)."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                              details: grpc.ClientCallDetails, request: Any) -> Any:
        deadline = None if details.timeout is None else self.clock() + details.timeout
        attempts = 0
        while True:
            outcome = continuation(details, request)
            attempts += 1
            if not outcome.done():  # `.future()` (a blocking call's outcome has ended): not waited for here
                return outcome
            error = outcome.exception()
            if error is None:
                return outcome
            told = told_retry_s(error.trailing_metadata()) if isinstance(error, grpc.Call) else None
            time_left = None if deadline is None else deadline - self.clock()
            pause = None if told is None else self.policy.pause_s(told, attempts, time_left, self.rng)
            if pause is None:
                return outcome
            log.debug("%s: %s (%s); attempt %d in %.2fs", details.method, error.code().name, error.details(),
                      attempts + 1, pause)
            self.sleep(pause)
            if deadline is not None:
                details = CallDetails(details.method, max(0.0, deadline - self.clock()), details.metadata,
                                      details.credentials, details.wait_for_ready, details.compression)
