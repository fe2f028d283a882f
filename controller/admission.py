"""Admission control for bursts of database work nobody can slow down at the source.

A thousand agents that lose their controller come back at once: each `Register` and each
`Connect` hello is a write transaction, and unbounded they exhaust the connection pool (SQLAlchemy
then fails every caller after its pool timeout, scheduling included) or, on SQLite, queue on the
one writer until their deadlines pass, so every agent retries and the herd never clears. The gate
lets `concurrency` callers in at once, queues up to `max_waiting` more, and refuses the rest at
once with UNAVAILABLE and a retry time that grows with the queue (and a random spread), so the
herd arrives over the time the controller needs to serve it.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from controller.errors import Unavailable

MIN_RETRY_S = 0.5
MAX_RETRY_S = 30.0
INITIAL_SERVICE_S = 0.05  # the guess of one admitted caller's time before any was measured
SMOOTHING = 0.2  # weight of the latest service time in the moving average


@dataclass
class AdmissionGate:
    what: str  # "agent registrations": said in the refusal
    concurrency: int
    max_waiting: int
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    refused: int = 0
    admitted: int = 0
    _waiting: int = 0
    _service_s: float = INITIAL_SERVICE_S
    _slots: asyncio.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_waiting < 0:
            raise ValueError(f"{self.what}: concurrency must be >= 1 and max_waiting >= 0")

    @property
    def waiting(self) -> int:
        return self._waiting

    def retry_after_s(self) -> float:
        """How long until the queue ahead has drained, spread over [1, 2) of it."""
        drain = (self._waiting + self.concurrency) / self.concurrency * self._service_s
        return min(MAX_RETRY_S, max(MIN_RETRY_S, drain * (1.0 + self.rng.random())))

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Enter (waiting for a slot), or raise `Unavailable` with a retry time when the queue is full."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)  # made in the loop that uses it
        if self._slots.locked() and self._waiting >= self.max_waiting:
            self.refused += 1
            wait_s = self.retry_after_s()
            raise Unavailable(f"the controller is busy with {self.what} ({self._waiting} waiting); retry in "
                              f"{wait_s:.3g}s", retry_after_ms=math.ceil(wait_s * 1000))
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        started = self.clock()
        try:
            yield
        finally:
            self._slots.release()
            self.admitted += 1
            self._service_s += SMOOTHING * (max(0.0, self.clock() - started) - self._service_s)
