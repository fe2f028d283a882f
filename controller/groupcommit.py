"""Group commit: callers' items written together, one transaction per batch.

Every write transaction takes the database's single writer (SQLite's lock; PostgreSQL's cluster
generation and audit chain head rows) from its first write to its commit, so one transaction
per call caps a burst of like calls (a join storm's Registers and hellos) at the writer's turn
time. A `GroupCommit` queues the items its callers hand it; one writer task at a time takes
everything queued (what arrived while the previous batch was committing: no timer, so an item
alone is written at once), up to `batch_max`, and hands the batch to `commit`, which returns
one outcome per item, in its place:
- a value: the caller's answer;
- an exception: raised in that caller alone (the item was judged and refused; the others stand);
- `ALONE` (None): the batch could not decide this item (it conflicts with another member, say);
  the caller decides it on its own, as if the batch had not existed.
If `commit` raises, nothing of the batch was written (one transaction) and every member goes
alone, so one bad item never fails the others; unless `shared_failure` says the exception is one
every member would meet alone too (the database or the lease failed): then each caller gets it,
rather than a batch's worth of lone transactions piling onto whatever failed. Items with the same `key` never share a batch:
the later one waits for the next (its outcome may depend on the earlier one's, as if they had
come one after the other). A caller that went away (cancelled) before its batch was formed is
left out; one that went away once its item was taken leaves it to be written with its batch,
and `left` is told while that batch is still writing (the item, and a future settled as the
batch ends, committed or not: whoever speaks for the gone caller, its audit entry, waits for
what the batch did); so is one answered that its batch had not committed in time (below). The
writer runs in a context of its own: it is nobody's call.

Deadlines: a caller that says how long it has (`submit(item, time_left_s)`) is answered before
that, with a reserve for the answer to reach it. Its item is taken into a batch only while the
batch can still be written in time (the recent time a batch took, plus its deviation); one still
queued when that moment passes leaves the queue, not written at all, and its caller is told to
retry later (UNAVAILABLE with a retry time). An item taken into a batch is written with it or
not at all, whoever still waits: if the batch has not committed when the caller's time is up,
the caller is told so (UNAVAILABLE, the item may have landed) and the batch goes on.
The recent time is measured only by batches written, so one slow batch (a stalled machine) could
make every later caller look too short of time and be refused unwritten for good, the estimate
never measured again (a 16,384-node join storm did that: 207 Registers written, 17,543 refused in
milliseconds). So once the estimate is older than itself (no batch written or in flight for
longer than it says a batch takes), it is put to the test: callers it would refuse are taken
into the next batch anyway (a probe), answered late if it is slow, and its time is measured.

`writers` batches may be written at once (each in its own transaction): worth it where the
batches' reads overlap and only their last statements take turns (PostgreSQL). Items with the
same key are never in two batches in flight.

Spacing (`BatchSpacing`, optional): every batch has costs its items share (a transaction, its
reads, what it appends and publishes), so the fewer items a batch carries the more each one costs.
Back to back, a batch carries what arrived while the one before was written: the faster the
database answers, the smaller the batches and the dearer each item, which is how a PostgreSQL with
up-to-date statistics cost the controller more CPU a submit and gave fewer submits a second
(docs/benchmarks.md, `spacing`). With a spacing, after a batch of at least `from_items` items (a
load that fills batches) with callers queued at its end, the next one begins no sooner than
`period_s` after that one began; a lone item or a few at once are written at once, as without,
and so is whoever comes to a writer that found nothing queued. The wait ends early for a queued
caller that could not be answered in time after it.

Retry times: a refused caller is told when to come back. A time derived from the queue alone
(what is queued now, times a batch's time) is short whatever the number of callers kept out, so
in a join storm thousands of refused agents came back within a second, were refused again, and
the refusals took the event loop from the batches (a 4,096-node join on SQLite answered 67,666
refusals and stalled). With a `RetryPacer` the group commit measures what it can write (items per
second of batch writing) and every caller refused anywhere in front of it (the admission gate, a
load-shedding check before the interceptors, the group commit itself) is given the next free
slot of that rate: callers come back one after another at about the rate they can be written,
the first refused first.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from controller.admission import SPREAD, MovingAverage, answer_reserve_s, spread_retry_s
from controller.errors import Unavailable

log = logging.getLogger("maia.groupcommit")

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

ALONE = None  # the outcome of an item the batch could not decide: its caller goes alone


@dataclass
class GroupStats:
    batches: int = 0
    items: int = 0
    alone: int = 0    # handed back to their callers (a conflict, or a batch that failed)
    largest: int = 0
    refused: int = 0  # left the queue unwritten: their batch could not have been written before their deadline
    late: int = 0     # answered before their batch had committed (their deadline was near); written with it
    probes: int = 0   # taken although the estimate said too late: it was older than itself (module docstring)
    spaced: int = 0   # batches that began later than the writer was free (`BatchSpacing`)


@dataclass(frozen=True)
class BatchSpacing:
    """After a batch of at least `from_items` items, the next begins no sooner than `period_s`
    after it began (module docstring)."""

    period_s: float
    from_items: int

    def __post_init__(self) -> None:
        if self.period_s < 0 or self.from_items < 1:
            raise ValueError(f"a batch spacing needs period_s >= 0 and from_items >= 1, not {self}")


@dataclass(eq=False)
class _Member(Generic[Item, Outcome]):
    """A queued item and what its caller waits on."""

    item: Item
    future: asyncio.Future[Outcome | None]
    latest_start: float = math.inf  # taken into a batch after this (clock), it could not be answered in time
    taken: bool = False             # in a batch: written with it or not at all
    ended: asyncio.Future[None] | None = None  # its caller left once it was taken: settled as its batch ends
    batch_ended: bool = False       # its batch ended, committed or not


# Pacing of refused callers (`RetryPacer`).
PACE_OVERBOOK = 1.25    # slots handed out this much faster than the measured rate: the queue never runs dry
PACE_INITIAL_RATE = 50.0  # items a second before any batch was measured
PACE_MIN_RATE = 2.0     # however slow the writes: a floor, so slots never stretch past reason
PACE_WINDOW_S = 10.0    # the rate is that of the batches written in this last stretch of time
PACE_MIN_S = 0.5        # no caller is told to come back sooner
PACE_MAX_S = 60.0       # nor later: past it the caller is told about that and takes no slot (it asks again)
PACE_JITTER = 0.1       # each slot's time stretched by up to this share (callers told alike do not collide)


@dataclass
class PacerStats:
    paced: int = 0   # refused callers given a slot
    capped: int = 0  # refused callers told PACE_MAX_S (the slots ran further): no slot taken


class RetryPacer:
    """Retry times for refused callers, paced at the rate the group commit writes (module docstring).

    `written(items, seconds)` measures: items per second of batch writing over the last
    `PACE_WINDOW_S`, which is the writer's capacity (under a backlog it writes back to back; when
    it idles, the rate measured is what it could do, so callers are asked to come faster and the
    backlog comes back). `retry_after_s()` hands out the next slot: `1 / (rate * PACE_OVERBOOK)`
    after the previous one, at least `PACE_MIN_S` from now; a slot further than `PACE_MAX_S` is not
    taken (the caller is told about `PACE_MAX_S`, then asks again and gets a slot then)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._batches: list[tuple[float, int, float]] = []  # (ended at, items, seconds writing)
        self._next = -math.inf  # (clock) the next free slot
        self.stats = PacerStats()

    def written(self, items: int, seconds: float) -> None:
        now = self._clock()
        self._batches.append((now, items, seconds))
        cut = 0
        while cut < len(self._batches) - 1 and self._batches[cut][0] < now - PACE_WINDOW_S:
            cut += 1
        del self._batches[:cut]

    def rate(self) -> float:
        """Items written per second of writing, lately (`PACE_INITIAL_RATE` before any batch)."""
        seconds = sum(b[2] for b in self._batches)
        if not self._batches or seconds <= 0:
            return PACE_INITIAL_RATE
        return max(PACE_MIN_RATE, sum(b[1] for b in self._batches) / seconds)

    def retry_after_s(self) -> float:
        now = self._clock()
        slot = max(self._next, now + PACE_MIN_S)
        if slot - now > PACE_MAX_S:
            self.stats.capped += 1
            return PACE_MAX_S * self._rng.uniform(1.0, 1.0 + PACE_JITTER)
        self._next = slot + 1.0 / (self.rate() * PACE_OVERBOOK)
        self.stats.paced += 1
        return (slot - now) * self._rng.uniform(1.0, 1.0 + PACE_JITTER)

    def backlog_s(self) -> float:
        """How far ahead the slots handed out run (0: none outstanding)."""
        return max(0.0, self._next - self._clock())


class GroupCommit(Generic[Item, Outcome]):
    """Items committed in batches (see the module docstring)."""

    def __init__(self, name: str, commit: Callable[[list[Item]], Awaitable[Sequence[Outcome | BaseException | None]]],
                 *, batch_max: int, key: Callable[[Item], Hashable] | None = None,
                 shared_failure: Callable[[Exception], bool] = lambda exc: False, writers: int = 1,
                 answer_reserve: Callable[[float], float] = answer_reserve_s,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 pacer: RetryPacer | None = None, spacing: BatchSpacing | None = None,
                 left: Callable[[Item, asyncio.Future[Any]], None] | None = None) -> None:
        if batch_max < 1 or writers < 1:
            raise ValueError(f"{name}: batch_max and writers must be >= 1")
        self.name = name
        self._commit = commit
        self._batch_max = batch_max
        self._key = key
        self._shared_failure = shared_failure
        self._left = left  # told of an item whose caller went away once it was taken (module docstring)
        self._writers_max = writers
        self._answer_reserve = answer_reserve  # what a caller's time left keeps for its answer to arrive
        self._clock = clock
        self._rng = rng or random.Random()
        self.pacer = pacer  # measures the batches and paces the callers refused (module docstring)
        self._spacing = spacing
        # The spacing's wait under way: (woken early by a caller that must start its batch before
        # `by`, by: a period after the wait ends).
        self._spacing_wait: tuple[asyncio.Future[None], float] | None = None
        self._pending: list[_Member[Item, Outcome]] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._keys_in_flight: set[Hashable] = set()
        self._write = MovingAverage(0.0)  # how long a batch takes to commit (no guess before the first)
        self._measured_at = -math.inf  # (clock) when a batch last ended, measured or not
        self._in_flight = 0            # batches being committed now
        self.stats = GroupStats()

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, item: Item, time_left_s: float | None = None) -> Outcome | None:
        """The item's outcome once its batch committed; raises what refused it; `ALONE` (None)
        when the batch could not decide it. With `time_left_s` (until the caller's deadline) the
        answer comes in time: `Unavailable` with a retry time when the item could not be written
        in time (it was not) or its batch had not committed by then (it is written with it)."""
        member: _Member[Item, Outcome] = _Member(item, asyncio.get_running_loop().create_future())
        member.future.add_done_callback(_retrieved)
        answer_by = math.inf
        if time_left_s is not None and math.isfinite(time_left_s):
            now = self._clock()
            answer_by = now + time_left_s - self._answer_reserve(time_left_s)
            member.latest_start = answer_by - self._write_bound_s()
            if member.latest_start <= now < answer_by and self._estimate_stale(now):
                self.stats.probes += 1
                member.latest_start = answer_by  # taken by the next batch, which measures again
        self._pending.append(member)
        if self._spacing_wait is not None and member.latest_start < self._spacing_wait[1]:
            _settle(self._spacing_wait[0])  # it cannot wait for the spacing to end
        self._start_writers()
        try:
            if not await self._answered_by(member, member.latest_start) and not member.taken:
                self._pending.remove(member)
                raise self._refuse()
            if not await self._answered_by(member, answer_by):
                self.stats.late += 1
                self._leave(member)
                raise self._busy("the batch writing this call had not committed when its deadline neared; it is "
                                 "written with that batch or not at all (a retry finds out)", may_have_landed=True)
        except asyncio.CancelledError:
            if not member.taken:  # its caller went away before its batch was formed: left out
                member.future.cancel()
            else:
                self._leave(member)
            raise
        return member.future.result()

    def _leave(self, member: _Member[Item, Outcome]) -> None:
        """Its caller goes (cancelled, or answered that its batch had not committed in time) while
        its batch may still be writing it: `left` is told, with a future settled as that batch
        ends. Not once the batch ended (it answered the member, or its writer was stopped: what
        becomes of the item is known now)."""
        if self._left is not None and not member.batch_ended and member.ended is None:
            member.ended = asyncio.get_running_loop().create_future()
            self._left(member.item, member.ended)

    async def _answered_by(self, member: _Member[Item, Outcome], until: float) -> bool:
        """Wait for the member's outcome until `until` (clock); whether it came. The caller waits
        on a future of its own, woken by the outcome or by a timer, so a caller cancelled meanwhile
        leaves the member's future alone (`submit` decides what its going means); with no
        deadline the member's future itself is awaited (cancelling it is the caller going). A
        timer and a callback cost about a third of `asyncio.timeout` over `asyncio.shield`, and
        every submit with a deadline (every gRPC call that has one) passes here."""
        if not math.isfinite(until):
            await member.future
            return True
        if member.future.done():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = waiter.get_loop().call_later(max(0.0, until - self._clock()), _settle, waiter)
        member.future.add_done_callback(waiter_settled := functools.partial(_settle, waiter))
        try:
            await waiter
        finally:
            timer.cancel()
            member.future.remove_done_callback(waiter_settled)
        return member.future.done()

    def _write_bound_s(self) -> float:
        return self._write.mean + SPREAD * self._write.deviation

    def _estimate_stale(self, now: float) -> bool:
        """No batch is being written and none ended for longer than the estimate says one takes:
        had batches been that slow, one would have been measured since (module docstring)."""
        return self._in_flight == 0 and now - self._measured_at > self._write_bound_s()

    def _retry_after_s(self) -> float:
        """The pacer's next slot; without one, how long until the queue ahead could be written,
        spread over [1, 2) of it."""
        if self.pacer is not None:
            return self.pacer.retry_after_s()
        batches = (len(self._pending) // self._batch_max + 1) / self._writers_max
        return spread_retry_s(batches * self._write.mean, self._rng)

    def _refuse(self) -> Unavailable:
        self.stats.refused += 1
        return self._busy(f"this call could not be written before its deadline ({len(self._pending)} queued, "
                          f"a batch takes {self._write.mean:.3g}s); nothing was written")

    def _busy(self, why: str, *, may_have_landed: bool = False) -> Unavailable:
        wait_s = self._retry_after_s()
        return Unavailable(f"{self.name}: busy; {why}; retry in {wait_s:.3g}s", retry_after_ms=math.ceil(wait_s * 1000),
                           may_have_landed=may_have_landed)

    def _start_writers(self) -> None:
        while len(self._writers) < self._writers_max and self._pending:
            writer = asyncio.create_task(self._write_batches(), name=self.name, context=contextvars.Context())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
            if len(self._writers) >= len(self._pending):
                break

    def _take(self) -> list[_Member[Item, Outcome]]:
        """The next batch: the pending items in order, up to `batch_max`, one per key and none
        whose key is in a batch in flight; items that could no longer be written in time are
        refused here."""
        batch: list[_Member[Item, Outcome]] = []
        now = self._clock()
        rest = []
        for member in self._pending:
            if member.future.done():  # its caller went away
                continue
            if now > member.latest_start:  # its caller would hear too late: not written
                member.future.set_exception(self._refuse())
                continue
            key = self._key(member.item) if self._key is not None else None
            if len(batch) >= self._batch_max or (key is not None and key in self._keys_in_flight):
                rest.append(member)
                continue
            if key is not None:
                self._keys_in_flight.add(key)
            member.taken = True
            batch.append(member)
        self._pending = rest
        return batch

    async def _spaced(self, began: float, size: int) -> None:
        """After a batch of `size` that began at `began`, wait for the spacing, if any, to allow the
        next (until `period_s` after `began`). Not when nothing is queued (the writer ends, and the
        next caller starts one at once), and not past what a queued caller can spare: one whose
        batch must start within a period of the wait's end (a period for the writer to get to it)
        is taken at once, and one queued meanwhile that must ends the wait (`submit`)."""
        if self._spacing is None or size < self._spacing.from_items or not self._pending:
            return
        until = began + self._spacing.period_s
        wait_s = until - self._clock()
        by = until + self._spacing.period_s
        if wait_s <= 0 or any(member.latest_start < by for member in self._pending):
            return
        self.stats.spaced += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = waiter.get_loop().call_later(wait_s, _settle, waiter)
        self._spacing_wait = (waiter, by)
        try:
            await waiter
        finally:
            timer.cancel()
            self._spacing_wait = None

    async def _write_batches(self) -> None:
        batch: list[_Member[Item, Outcome]] = []
        try:
            while self._pending:
                batch = self._take()
                if not batch:  # what is left waits for keys in flight: their writer takes it next
                    return
                started = self._clock()
                self._in_flight += 1
                try:
                    outcomes = await self._commit([member.item for member in batch])
                except Exception as exc:  # nothing written: each member is decided alone, or fails with it
                    shared = self._shared_failure(exc)
                    log.warning("%s: a batch of %d did not commit (%s: %s); %s", self.name, len(batch),
                                type(exc).__name__, exc, "each fails with it" if shared else "each goes alone")
                    outcomes = [exc if shared else ALONE] * len(batch)
                else:
                    took = self._clock() - started
                    self._write.add(took)
                    if self.pacer is not None:
                        self.pacer.written(len(batch), took)
                finally:
                    self._in_flight -= 1
                    self._measured_at = self._clock()
                    self._release_keys(batch)
                    for member in batch:  # committed or not: its gone caller's audit is decided
                        member.batch_ended = True
                        if member.ended is not None:
                            _settle(member.ended)
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
                for member, outcome in zip(batch, outcomes, strict=True):
                    if outcome is ALONE:
                        self.stats.alone += 1
                    if member.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        member.future.set_exception(outcome)
                    else:
                        member.future.set_result(outcome)
                size, batch = len(batch), []
                await self._spaced(started, size)
        except BaseException:  # cancelled (the controller stops): so are the callers waiting
            for member in [*batch, *self._pending]:
                member.future.cancel()
            self._pending = []
            raise
        finally:
            # Out of the writers now, in the step that saw nothing left to take, not by the done
            # callback a turn later: a caller queuing in between would find this writer counted,
            # start none, and wait for good.
            writer = asyncio.current_task()
            if writer is not None:
                self._writers.discard(writer)

    def _release_keys(self, batch: list[_Member[Item, Outcome]]) -> None:
        if self._key is not None:
            for member in batch:
                self._keys_in_flight.discard(self._key(member.item))


def _settle(waiter: asyncio.Future[None], *_: object) -> None:
    """Wake a caller of `_answered_by` (its outcome came, or its time is up), once."""
    if not waiter.done():
        waiter.set_result(None)


def _retrieved(future: asyncio.Future) -> None:
    """Mark an outcome nobody awaits any more (its caller left) as seen: no 'never retrieved' noise."""
    if not future.cancelled():
        future.exception()


def by_member(commit: Callable[[list[Item]], Awaitable[Mapping[int, Outcome | BaseException]]], *,
              within: Callable[[], AbstractContextManager[Any]] = nullcontext,
              ) -> Callable[[list[Item]], Awaitable[list[Outcome | BaseException | None]]]:
    """A `GroupCommit`'s `commit` made of one that answers by id(item) (an item it leaves out goes
    `ALONE`), each batch written `within` a context (its writer's priority, say)."""

    async def in_order(batch: list[Item]) -> list[Outcome | BaseException | None]:
        with within():
            outcomes = await commit(batch)
        return [outcomes.get(id(item), ALONE) for item in batch]

    return in_order


async def outcome_or_alone(group: GroupCommit[Item, Outcome], item: Item,
                           time_left_s: float | None = None) -> Outcome | None:
    """`group.submit(item, time_left_s)` for a caller that decides alone what the batch did not;
    `ALONE` (None) when the batch could not decide it or the writer was stopped (the controller
    stops). Raises what refused it (`Unavailable` when its deadline came first: `submit`), and the
    caller's own cancellation (a member its caller left is still written with its batch once taken
    into it). In the caller's task: no task of its own to start and to wake the caller from (two
    turns of the event loop each way)."""
    try:
        return await group.submit(item, time_left_s)
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():  # type: ignore[union-attr]
            raise  # the caller itself was cancelled
        return ALONE
