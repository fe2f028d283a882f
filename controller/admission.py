"""Admission control for bursts of database work nobody can slow down at the source.

A thousand agents that lose their controller come back at once: each `Register` and each
`Connect` hello is a write transaction, and unbounded they exhaust the connection pool (SQLAlchemy
then fails every caller after its pool timeout, scheduling included) or, on SQLite, queue on the
one writer until their deadlines pass, so every agent retries and the herd never clears. The gate
lets `concurrency` callers in at once and queues the rest, and it refuses at once, with a retry
time that grows with the queue (and a random spread) so the herd arrives over the time the
controller needs to serve it:
- a caller that would wait longer than it has: its expected wait (the services ahead of it, its
  place in the queue shared by `concurrency`, times the measured time each took to clear, plus
  `SPREAD` times its measured deviation) exceeds what its deadline leaves once its own service is
  paid, with a reserve (RESOURCE_EXHAUSTED: queued, it would only time out, after holding a place others could use).
  The time a place takes to clear is measured from the waits themselves (the wait of each admitted
  caller over the services it had ahead), not from the service alone: on a busy event loop the
  hand-over from one caller to the next costs time too. An estimate can be wrong: a queued caller
  whose turn has not come when only that reserve is left is refused then, the same way,
  rather than left to time out in the queue (waited_out);
- any caller once `max_waiting` are queued (UNAVAILABLE: a bound on memory whatever the deadlines).
On a lagging event loop (`loop_lagged`, fed from `observability.loop`) a refusal due at some
instant is sent late by about that lag: the reserve a deadline keeps grows by it, so a caller is
answered before its deadline rather than cancelled in the queue (abandoned) by its client.
`judge` is that rule alone, a pure function; `AdmissionGate` keeps the queue and the measurements.
"""
from __future__ import annotations

import asyncio
import enum
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from controller import limits
from controller.errors import MaiaError, ResourceExhausted, Unavailable

MIN_RETRY_S = 0.5
MAX_RETRY_S = 30.0
INITIAL_SERVICE_S = 0.05  # the guess of one admitted caller's time before any was measured
SMOOTHING = 0.2  # weight of the latest service time in the moving averages (its mean and deviation)
# Mean deviations of the time per place added to it before comparing the wait with the deadline (as
# TCP's retransmission timeout adds 4 to the smoothed round trip): the expectation is a mean, and
# the last callers admitted must still make it when the queue moves slower than usual.
SPREAD = 1.0
# What a caller's deadline must keep after its wait: its own service, twice over (a slow one), and
# at least this share of the deadline (the answer must still reach it on a busy event loop).
RESERVE_SHARE = 0.1
# Mean deviations of the event loop's lag added to it for the time an answer may be late (spiky:
# one long stretch of work now and then), as many as TCP adds to its round trip's.
LAG_SPREAD = 4.0


class Refusal(enum.Enum):
    """Why a caller was refused (the `reason` label of the refusal counter)."""

    DEADLINE = "deadline"      # it would wait longer than its deadline leaves
    QUEUE_FULL = "queue_full"  # `max_waiting` callers are queued already
    WAITED_OUT = "waited_out"  # queued, but its turn had not come when only its own service time was left


@dataclass(frozen=True, slots=True)
class QueueState:
    """What the gate knows when a caller arrives."""

    inside: int         # callers being served
    waiting: int        # callers queued ahead
    concurrency: int
    max_waiting: int
    service_s: float    # the recent time one caller is served (a moving average)
    turn_s: float       # the recent time one service ahead took to clear, as its waiters saw it
    turn_dev_s: float = 0.0  # how far that is from its average (a moving mean deviation)
    lag_s: float = 0.0       # how late the event loop runs a timer now (its bound): an answer is that late too

    def services_ahead(self) -> float:
        """Services before an arriving caller's turn: none while a slot is free, else the
        `waiting + 1` ahead of it (the queue and the slot it waits for), `concurrency` at a time."""
        if self.inside < self.concurrency and self.waiting == 0:
            return 0.0
        return (self.waiting + 1) / self.concurrency

    def expected_wait_s(self) -> float:
        return self.services_ahead() * self.turn_s

    def wait_bound_s(self) -> float:
        """The expected wait with its margin: `SPREAD` deviations more per service ahead."""
        return self.services_ahead() * (self.turn_s + SPREAD * self.turn_dev_s)


def judge(state: QueueState, time_left_s: float | None) -> Refusal | None:
    """Admit (None) or refuse an arriving caller with `time_left_s` until its deadline (None: none)."""
    if state.services_ahead() == 0.0:
        return None
    if state.waiting >= state.max_waiting:
        return Refusal.QUEUE_FULL
    if time_left_s is not None and math.isfinite(time_left_s) and \
            state.wait_bound_s() > time_left_s - reserve_s(time_left_s, state.service_s, state.lag_s):
        return Refusal.DEADLINE
    return None


def reserve_s(time_left_s: float, service_s: float, lag_s: float = 0.0) -> float:
    """The part of a caller's remaining time its wait may not use (`RESERVE_SHARE`), and on a
    lagging event loop that lag more: a refusal due at some instant is sent that much later."""
    return max(2 * service_s, RESERVE_SHARE * time_left_s) + lag_s


def spread_retry_s(drain_s: float, rng: random.Random) -> float:
    """A retry time for a caller refused now: `drain_s` (until the queue ahead could have
    drained) spread over [1, 2) of it, so refused callers do not all come back at once, within
    [`MIN_RETRY_S`, `MAX_RETRY_S`]."""
    return min(MAX_RETRY_S, max(MIN_RETRY_S, drain_s * (1.0 + rng.random())))


def answer_reserve_s(time_left_s: float, lag_s: float = 0.0) -> float:
    """What a caller already inside must keep of its remaining time for its answer to arrive."""
    return RESERVE_SHARE * time_left_s + lag_s


class AdmissionObserver(Protocol):
    """What the gate reports (`controller.observability.metrics.ControllerMetrics` implements it)."""

    def admission_admitted(self, waited_s: float) -> None: ...

    def admission_refused(self, reason: str) -> None: ...

    def admission_abandoned(self) -> None: ...

    def admission_late(self) -> None: ...


@dataclass
class AdmissionGate:
    what: str  # "agent registrations": said in the refusal
    concurrency: int
    max_waiting: int
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    observer: AdmissionObserver | None = None
    # When a refused caller should come back (a `groupcommit.RetryPacer`'s slots); None: `retry_after_s`'s own rule.
    pace: Callable[[], float] | None = None
    refused: int = 0
    admitted: int = 0
    # Callers that left the queue before their turn (their deadline passed, or they went away)
    # while the gate still let them wait; `late`: those whose refusal was due already, but the event
    # loop had not run it yet (it was stalled longer than the reserve).
    abandoned: int = 0
    late: int = 0
    _inside: int = 0
    _waiting: int = 0
    _service_s: float = INITIAL_SERVICE_S
    _turn: MovingAverage = field(default_factory=lambda: MovingAverage(INITIAL_SERVICE_S))
    _lag: MovingAverage = field(default_factory=lambda: MovingAverage(0.0))
    _slots: asyncio.Semaphore | None = None
    _queued: set[asyncio.Task] = field(default_factory=set)  # the tasks waiting for a slot now
    _closed: str = ""  # why the gate refuses everyone (`close`), or ""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_waiting < 0:
            raise ValueError(f"{self.what}: concurrency must be >= 1 and max_waiting >= 0")

    @property
    def waiting(self) -> int:
        return self._waiting

    def state(self) -> QueueState:
        return QueueState(self._inside, self._waiting, self.concurrency, self.max_waiting, self._service_s,
                          self._turn.mean, self._turn.deviation, self.lag_s())

    def loop_lagged(self, seconds: float) -> None:
        """How late a short timer of the event loop fired (`observability.loop.watch_event_loop`)."""
        self._lag.add(seconds)

    def lag_s(self) -> float:
        """How late the event loop may run a timer now: the recent lag and `LAG_SPREAD` deviations."""
        return self._lag.mean + LAG_SPREAD * self._lag.deviation

    def answer_reserve_s(self, time_left_s: float) -> float:
        """`answer_reserve_s` on this gate's event loop (for work its callers wait for inside)."""
        return answer_reserve_s(time_left_s, self.lag_s())

    def retry_after_s(self) -> float:
        """How long until the queue ahead has drained, spread over [1, 2) of it (or `pace`'s time)."""
        if self.pace is not None:
            return self.pace()
        return spread_retry_s((self._waiting + self.concurrency) / self.concurrency * self._turn.mean, self.rng)

    def close(self, reason: str) -> None:
        """Refuse every caller from now on with UNAVAILABLE (`reason`: the controller is stopping),
        the queued ones at once: none is left to be cancelled by the server's stop, and nothing of
        theirs was written."""
        self._closed = reason
        for task in self._queued:
            task.cancel(_CLOSING)

    @asynccontextmanager
    async def admit(self, time_left_s: float | None = None, *, pass_when_full: bool = False) -> AsyncIterator[None]:
        """Enter (waiting for a slot), or raise with a retry time when the caller, with `time_left_s`
        until its deadline (None: no deadline), would wait too long or the queue is full.
        `pass_when_full`: a caller that completes work already admitted (a hello after its
        Register) is never refused for a full queue: it goes in without a slot then (the queue
        bound is a bound on memory; such callers are bounded by their own work)."""
        if self._closed:
            raise self._closing()
        if pass_when_full and self._waiting >= self.max_waiting:
            yield
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)  # made in the loop that uses it
        state = self.state()
        refusal = judge(state, time_left_s)
        if refusal is not None:
            raise self._refuse(refusal, time_left_s)
        ahead = state.services_ahead()
        self._waiting += 1
        queued = self.clock()
        task = asyncio.current_task()
        if task is not None:
            self._queued.add(task)
        refuse_at: float | None = None  # when the caller is refused if its turn has not come (WAITED_OUT)
        try:
            if time_left_s is None or not math.isfinite(time_left_s) or not self._slots.locked():
                await self._slots.acquire()
            else:  # the estimate was wrong: answer while the caller can still hear it, not at its deadline
                patience = max(0.0, time_left_s - reserve_s(time_left_s, self._service_s, self.lag_s()))
                refuse_at = queued + patience
                async with asyncio.timeout(patience):
                    await self._slots.acquire()
        except TimeoutError:
            self._turn.add((self.clock() - queued) / max(ahead, 1.0))  # the queue moved slower than thought
            raise self._refuse(Refusal.WAITED_OUT, time_left_s) from None
        except BaseException as exc:
            if (isinstance(exc, asyncio.CancelledError) and exc.args == (_CLOSING,) and task is not None
                    and task.uncancel() == 0):
                raise self._closing() from None  # `close`: refused, not abandoned
            if refuse_at is not None and self.clock() >= refuse_at:
                # Its refusal was due before its deadline, but the event loop ran it too late (stalled
                # past the reserve: a starved machine, a long synchronous step): gRPC's deadline
                # cancellation came first. The loop's lateness, not a caller the gate let wait.
                self.late += 1
                if self.observer is not None:
                    self.observer.admission_late()
            else:
                self.abandoned += 1
                if self.observer is not None:
                    self.observer.admission_abandoned()
            raise
        finally:
            self._waiting -= 1
            self._queued.discard(task)
        started = self.clock()
        if ahead:
            self._turn.add((started - queued) / ahead)
        self._inside += 1
        if self.observer is not None:
            self.observer.admission_admitted(started - queued)
        try:
            yield
        finally:
            self._inside -= 1
            self._slots.release()
            self.admitted += 1
            self._service_s += SMOOTHING * (max(0.0, self.clock() - started) - self._service_s)

    def _closing(self) -> MaiaError:
        return Unavailable(f"{self._closed}; nothing was written; retry (another controller, or this one "
                           f"once it is back)")

    def _refuse(self, refusal: Refusal, time_left_s: float | None) -> MaiaError:
        self.refused += 1
        if self.observer is not None:
            self.observer.admission_refused(refusal.value)
        wait_s = self.retry_after_s()
        retry = f"retry in {wait_s:.3g}s"
        if refusal is Refusal.WAITED_OUT:
            return ResourceExhausted(
                f"the controller is busy with {self.what}: this call's turn did not come in the "
                f"{time_left_s:.3g}s its deadline left ({self._waiting} waiting); {retry}",
                retry_after_ms=math.ceil(wait_s * 1000))
        if refusal is Refusal.DEADLINE:
            return ResourceExhausted(
                f"the controller is busy with {self.what}: the expected wait "
                f"({self.state().expected_wait_s():.3g}s, {self._waiting} waiting) is longer than the call's "
                f"deadline leaves ({time_left_s:.3g}s); {retry}", retry_after_ms=math.ceil(wait_s * 1000))
        return Unavailable(f"the controller is busy with {self.what} ({self._waiting} waiting); {retry}",
                           retry_after_ms=math.ceil(wait_s * 1000))


_CLOSING = "admission gate closed"  # the cancellation message `close` sends its queued callers


@dataclass
class MovingAverage:
    """A moving average and a moving mean deviation from it (weight `SMOOTHING` for the latest)."""

    mean: float
    deviation: float = 0.0

    def add(self, value: float) -> None:
        self.deviation += SMOOTHING * (abs(value - self.mean) - self.deviation)
        self.mean += SMOOTHING * (value - self.mean)


def agent_admission_gate(concurrency: int = limits.AGENT_ADMISSION_CONCURRENCY,
                         max_waiting: int = limits.AGENT_ADMISSION_QUEUE,
                         observer: AdmissionObserver | None = None) -> AdmissionGate:
    """The gate of agent Registers and Connect hellos (the defaults are the controller flags')."""
    return AdmissionGate("agent registrations", concurrency, max_waiting, observer=observer)
