"""Token buckets: per agent stream (shard reports) and per tenant (submits, dry runs), and a
sampler of floods (one record of many like refusals, with how many went without one).

A bucket holds at most `burst` tokens and refills at `rate` tokens a second; a call that finds
no token is refused with the seconds until one is due, so the caller can be told when to retry
(`RESOURCE_EXHAUSTED` with `retry-after-ms` and a `google.rpc.RetryInfo` status detail). Time comes from an injected clock, so tests step
it by hand instead of sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.errors import ResourceExhausted
from controller.identity import Principal, Role

RETRY_AFTER_METADATA_KEY = "retry-after-ms"


@dataclass
class TokenBucket:
    rate: float   # tokens per second
    burst: float  # the most it holds (a full bucket at start)
    tokens: float = math.nan
    updated: float = math.nan

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens: 0.0 if taken, else the seconds until they would be there."""
        if math.isnan(self.tokens):
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate if self.rate > 0 else math.inf

    def retune(self, rate: float, burst: float, now: float) -> None:
        """A new rate and burst from `now` on, keeping what was spent: filled at the old rate up
        to now, then no more than the new burst (a fresh bucket would hand out a full burst at
        every change)."""
        if not math.isnan(self.tokens):
            self.tokens = min(burst, self.tokens + max(0.0, now - self.updated) * self.rate)
            self.updated = now
        self.rate, self.burst = rate, burst


class Sampler:
    """Records (an audit entry, a log line) for a flood of like events, at most at a bucket's rate:
    `sample()` says whether this one gets a record and how many went without one since the last
    that did (a record says so: `unaudited_before=N`, `suppressed=N`)."""

    def __init__(self, per_minute: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._bucket = TokenBucket(per_minute / 60.0, burst)
        self._clock = clock
        self.left_out = 0  # events since the last record that got none of their own

    def sample(self) -> int | None:
        """None: no record for this one (counted); else the events left out before it."""
        if self._bucket.take(self._clock()):
            self.left_out += 1
            return None
        skipped, self.left_out = self.left_out, 0
        return skipped


def rate_limited(what: str, wait_s: float) -> ResourceExhausted:
    """The error a refused call gets: the message says when, `retry-after-ms` says it to programs."""
    wait_ms = max(1, math.ceil(wait_s * 1000)) if math.isfinite(wait_s) else 60_000
    return ResourceExhausted(f"{what}; retry in {wait_ms / 1000:.3g}s", retry_after_ms=wait_ms)


@dataclass
class KeyedRateLimiter:
    """One bucket per key (a tenant), `per_minute` tokens a minute, bursting to the same number."""

    per_minute: float
    what: str  # "submits", "dry runs": said in the refusal
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 100_000  # buckets kept; beyond it all are forgotten (tenants are far fewer)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, key: str) -> None:
        """Take a token for `key` or raise RESOURCE_EXHAUSTED with retry info."""
        if self.per_minute <= 0:
            return  # 0: unlimited
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.clear()
            bucket = self._buckets[key] = TokenBucket(self.per_minute / 60.0, max(1.0, self.per_minute))
        wait = bucket.take(self.clock())
        if wait:
            raise rate_limited(f"tenant {key} exceeded {self.per_minute:g} {self.what} a minute", wait)


@dataclass
class SubmitLimits:
    """What bounds submissions, changes and dry runs: per-tenant rates, and dry runs' share of the
    solver (at most `dry_run_slots` solving at once, each for at most `dry_run_time_limit_ms`).
    `changes`: a tenant token's updates and deletions of deployments (each update may start a
    rollout, each call is an audit entry, refused ones too); an operator's are not counted."""

    submits: KeyedRateLimiter
    dry_runs: KeyedRateLimiter
    changes: KeyedRateLimiter = field(default_factory=lambda: KeyedRateLimiter(0.0, "updates and deletions"))
    dry_run_slots: int = 1
    dry_run_time_limit_ms: int = 2000
    _running: int = 0

    def check_submit(self, tenant: str) -> None:
        self.submits.check(tenant)

    def check_change(self, who: Principal) -> None:
        """An update or deletion by `who`: a tenant token takes one of its tenant's tokens."""
        if who.role is Role.TENANT:
            self.changes.check(who.tenant)

    def start_dry_run(self, tenant: str) -> None:
        """Take a solver slot and a dry run's rate token (release with `end_dry_run`). No slot
        free: refused before the token is taken (a tenant kept out by others' dry runs, trying
        again when told, spent its whole minute on refusals, then was refused for its rate)."""
        if self._running >= self.dry_run_slots:
            raise rate_limited(f"{self._running} dry run(s) are being solved now (at most {self.dry_run_slots})",
                               self.dry_run_time_limit_ms / 1000)
        self.dry_runs.check(tenant)
        self._running += 1

    def end_dry_run(self) -> None:
        self._running -= 1
