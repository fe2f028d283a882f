"""When reconcile passes run: the run loop's pacing and the retry back-off.

A pass follows the last one at most every `PASS_PERIOD_S` and yields to answered submit and delete
batches being written (`make_room`); a whole-cluster pass is followed by a pause as long as it
took (`MAX_FULL_PASS_PAUSE_S` at most, `Reconciler._run`); a pass that left work it may place on
another try (a time-limited solve, replicas the plan applier turned away) is solved again after a
back-off doubling up to a cap, even on an unchanged cluster (`RetryBackoff`); one that preempted
made progress, and the next is solved after the first step of the back-off again (a preemption
search places a few replicas a solve: `scheduler.solve.ROOM_TRIALS`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from controller.store.db import Database
from scheduler import Plan

from controller.reconcile.helpers import time_limited


# The longest pause after a whole-cluster pass (`Reconciler.run`).
MAX_FULL_PASS_PAUSE_S = 5.0
# Passes start at most this often; then each waits while answered batches are written, until the
# second more since the last one began (`make_room`).
PASS_PERIOD_S = 0.1
ANSWER_YIELD_MAX_S = 0.05


async def make_room(db: Database | None, last_started: float | None) -> None:
    """Before a pass that follows the last one closely: wait until `PASS_PERIOD_S` after the
    last one started, then while `db`'s submit or delete batches (their callers waiting) are being
    written or are about to be (`WriterTurns.answering`), until `ANSWER_YIELD_MAX_S` more.
    At 50 submits a second on 4,096 nodes passes ran back to back, a core's worth, each
    taking the event loop and SQLite's writer from the batches a caller waits for; the
    arrivals a pass waits for here are decided by it rather than by one more pass. A pass
    that took longer than both (saturation) is followed at once, as before. The pass goes as
    soon as the last such batch leaves the writer (`WriterTurns.wait_until_not_answering`, woken
    by the turns, not a poll)."""
    if last_started is None:
        return
    wait_s = last_started + PASS_PERIOD_S - time.perf_counter()
    if wait_s > 0:
        await asyncio.sleep(wait_s)
    turns = None if db is None else db.turns
    if turns is None:
        return
    left_s = last_started + PASS_PERIOD_S + ANSWER_YIELD_MAX_S - time.perf_counter()
    if left_s > 0:
        await turns.wait_until_not_answering(left_s)


class RetryBackoff:
    """When a pass is solved again although nothing changed (`schedule`, `due`)."""

    def __init__(self, *, backoff_s: float, max_backoff_s: float, clock: Callable[[], float]) -> None:
        self._retry_backoff = backoff_s
        self._max_retry_backoff = max_backoff_s
        self._clock = clock
        self._time_limited_passes = 0  # in a row: the back-off doubles with each
        self._retry_at: float | None = None

    def due(self, now: float) -> bool:
        """The retry scheduled is due at `now`."""
        return self._retry_at is not None and now >= self._retry_at

    def cancel(self) -> None:
        """No retry is due (a resync solves anyway)."""
        self._retry_at = None

    def schedule(self, plan: Plan, *, requeued: bool = False) -> float | None:
        """After a commit: when to solve again although nothing changed (None: not needed):
        the solve stopped at its time limit with work left, or the applier turned replicas away."""
        if not (requeued or time_limited(plan)):
            self._time_limited_passes, self._retry_at = 0, None
            return None
        if plan.preempted:  # the search made room this time (its trial budget ends it): it goes on soon
            self._time_limited_passes = 0
        delay = min(self._retry_backoff * 2 ** self._time_limited_passes, self._max_retry_backoff)
        self._time_limited_passes += 1
        self._retry_at = self._clock() + delay
        return delay
