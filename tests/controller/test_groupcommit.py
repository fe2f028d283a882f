"""controller.groupcommit: items that arrive together are committed in one batch, each answered
alone; a batch that fails hands every member back; items with one key never share a batch."""
from __future__ import annotations

import asyncio
import contextvars
from contextlib import contextmanager

import pytest

from controller.admission import MAX_RETRY_S, MIN_RETRY_S, MovingAverage
from controller.errors import FailedPrecondition, Unavailable
from controller.groupcommit import (
    ALONE, PACE_INITIAL_RATE, PACE_MAX_S, PACE_MIN_RATE, PACE_MIN_S, PACE_OVERBOOK, PACE_WINDOW_S, BatchSpacing,
    GroupCommit, RetryPacer, by_member, outcome_or_alone,
)


class Store:
    """A commit that records its batches and waits for `release` before each returns."""

    def __init__(self, *, fail_with: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail_with = fail_with

    async def commit(self, batch: list[str]) -> list[str | Exception]:
        self.batches.append(list(batch))
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [FailedPrecondition(f"{item} is refused") if item.startswith("bad") else item.upper()
                for item in batch]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_items_arriving_while_a_batch_commits_go_together_in_the_next():
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    first = asyncio.create_task(group.submit("a"))
    await _settle()
    assert store.batches == [["a"]]  # alone: written at once, no timer
    rest = [asyncio.create_task(group.submit(x)) for x in ("b", "bad-c", "d")]
    await _settle()
    store.release.set()
    assert await first == "A"
    assert await rest[0] == "B" and await rest[2] == "D"
    with pytest.raises(FailedPrecondition, match="bad-c is refused"):  # only its own caller hears it
        await rest[1]
    assert store.batches == [["a"], ["b", "bad-c", "d"]]
    assert group.stats.batches == 2 and group.stats.largest == 3


async def test_a_caller_queued_in_the_turn_its_writer_stops_is_still_written():
    """The writer stops (nothing pending) and, in that same turn of the event loop, a caller woken
    by the batch it just wrote queues an item: a writer is started for it. The writer used to leave
    the group's set of writers only by its done callback, a turn later, so the caller found it
    still counted, none was started, and it waited for good (a simnode's hello in CI: 3 of 4
    nodes connected, the fourth's stream open and never answered)."""
    woken = asyncio.Event()

    async def commit(batch: list[str]) -> list[str]:
        woken.set()  # the next caller runs after this writer's step, before its done callbacks
        return [item.upper() for item in batch]

    group: GroupCommit[str, str] = GroupCommit("t", commit, batch_max=8)

    async def next_caller() -> str | None:
        await woken.wait()
        return await group.submit("b")

    later = asyncio.create_task(next_caller())
    await asyncio.sleep(0)  # it waits for the first batch
    assert await group.submit("a") == "A"
    assert await asyncio.wait_for(later, 10) == "B"


async def test_a_batch_holds_at_most_batch_max_and_one_item_per_key():
    store = Store()
    store.release.set()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=2, key=lambda item: item[0])
    answers = await asyncio.gather(*(group.submit(x) for x in ("x1", "x2", "y1", "z1", "y2")))
    assert answers == ["X1", "X2", "Y1", "Z1", "Y2"]
    assert store.batches == [["x1", "y1"], ["x2", "z1"], ["y2"]]  # in arrival order, x2 after x1, y2 after y1


async def test_a_batch_that_fails_hands_every_member_back_to_go_alone():
    store = Store(fail_with=RuntimeError("the database went away"))
    store.release.set()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    assert await asyncio.gather(group.submit("a"), group.submit("bad-b")) == [ALONE, ALONE]
    assert group.stats.alone == 2


@pytest.mark.parametrize("time_left_s", [None, 30.0])  # awaiting its outcome, or a waiter with a timer
async def test_a_caller_that_went_away_is_left_out_of_the_next_batch(time_left_s: float | None):
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    first = asyncio.create_task(group.submit("a", time_left_s))
    await _settle()
    gone = asyncio.create_task(group.submit("b", time_left_s))
    stays = asyncio.create_task(group.submit("c", time_left_s))
    await _settle()
    gone.cancel()
    store.release.set()
    assert await first == "A" and await stays == "C"
    assert store.batches == [["a"], ["c"]]


async def test_when_the_writer_is_cancelled_so_are_its_callers():
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    inflight = asyncio.create_task(group.submit("a"))
    await _settle()
    queued = asyncio.create_task(group.submit("b"))
    await _settle()
    for writer in list(group._writers):
        writer.cancel()
    for caller in (inflight, queued):
        with pytest.raises(asyncio.CancelledError):
            await caller


async def test_a_batch_that_fails_for_everyone_fails_every_member_with_it():
    """The database or the lease failed: alone each would fail too, so none is retried alone."""
    lost = RuntimeError("the lease is lost")
    store = Store(fail_with=lost)
    store.release.set()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10,
                                               shared_failure=lambda exc: exc is lost)
    answers = await asyncio.gather(group.submit("a"), group.submit("b"), return_exceptions=True)
    assert answers == [lost, lost] and group.stats.alone == 0


async def test_a_queued_item_whose_batch_could_not_be_written_in_time_is_refused_unwritten():
    """A batch takes ~10 s here: a caller with 1 s left is told at once to come back (nothing of
    it written); one with time for a batch leaves the queue when that time is gone behind a slow
    batch in flight, unwritten too."""
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    inflight = asyncio.create_task(group.submit("a"))
    await _settle()
    group._write = MovingAverage(10.0)
    with pytest.raises(Unavailable, match="nothing was written") as refused:
        await group.submit("b", time_left_s=1.0)
    assert MIN_RETRY_S * 1000 <= refused.value.retry_after_ms <= MAX_RETRY_S * 1000
    assert not refused.value.may_have_landed  # unwritten: "call again as it is" (google.rpc.RetryInfo)
    group._write = MovingAverage(0.05)
    with pytest.raises(Unavailable, match="nothing was written"):
        await group.submit("c", time_left_s=0.3)  # the batch of "a" is still being written
    store.release.set()
    assert await inflight == "A"
    assert store.batches == [["a"]] and group.queued == 0 and group.stats.refused == 2


async def test_an_estimate_older_than_itself_is_measured_again_instead_of_refusing_for_good():
    """One batch took 10 s (a stalled machine): right after it a caller with 3 s left is refused
    unwritten, as the estimate says; once more than the estimate has passed with nothing written,
    such a caller is taken into a batch anyway (a probe), and the fast batch it measures lets the
    next callers in again. Without the probe every later caller would be refused for good: only
    written batches are measured."""
    now = [0.0]

    async def commit(batch: list[str]) -> list[str]:
        if batch == ["slow"]:
            now[0] += 10.0
        return [item.upper() for item in batch]

    group: GroupCommit[str, str] = GroupCommit("test", commit, batch_max=10, clock=lambda: now[0])
    assert await group.submit("slow") == "SLOW"
    with pytest.raises(Unavailable, match="nothing was written"):
        await group.submit("early", time_left_s=3.0)
    estimate = group._write_bound_s()  # what a batch takes, as far as it knows (> 3 s)
    now[0] += estimate / 2  # less than that since the slow batch ended: still trusted
    with pytest.raises(Unavailable, match="nothing was written"):
        await group.submit("still-early", time_left_s=3.0)
    now[0] += estimate  # more than that: it is put to the test
    assert await group.submit("probe", time_left_s=3.0) == "PROBE"
    assert group.stats.probes == 1 and group.stats.refused == 2
    assert group._write_bound_s() < estimate  # measured again, lower
    for _ in range(12):  # fast batches bring it down to what batches take now
        assert await group.submit("next", time_left_s=30.0) == "NEXT"
    assert await group.submit("in-time", time_left_s=3.0) == "IN-TIME"
    assert group.stats.probes == 1


async def test_a_member_of_a_batch_in_flight_is_answered_before_its_deadline_and_written_with_it():
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    with pytest.raises(Unavailable, match="written with that batch or not at all") as late:
        await group.submit("a", time_left_s=0.3)  # its batch never commits in that time
    assert late.value.retry_after_ms is not None
    assert late.value.may_have_landed  # told when, not "call again as it is" (no google.rpc.RetryInfo)
    assert store.batches == [["a"]] and group.stats.late == 1
    follower = asyncio.create_task(group.submit("b"))
    store.release.set()
    assert await follower == "B"
    assert store.batches == [["a"], ["b"]] and group.stats.items == 2  # "a" was written, whole, with its batch


class GatedStore:
    """A commit that records when each batch began and holds it until its gate is opened."""

    def __init__(self) -> None:
        self.began: list[tuple[float, list[str]]] = []  # (loop time, batch)
        self.gates: list[asyncio.Event] = []

    async def commit(self, batch: list[str]) -> list[str]:
        self.began.append((asyncio.get_running_loop().time(), list(batch)))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return [item.upper() for item in batch]

    @property
    def batches(self) -> list[list[str]]:
        return [batch for _, batch in self.began]

    def gap_s(self, later: int, earlier: int) -> float:
        return self.began[later][0] - self.began[earlier][0]


async def _a_full_batch_in_flight(group: GroupCommit[str, str], store: GatedStore) -> list[asyncio.Task[str | None]]:
    """["a"] alone, then ["b", "c"] (two: a full batch for `from_items=2`) written and still in flight."""
    calls = [asyncio.create_task(group.submit("a"))]
    await _settle()
    calls += [asyncio.create_task(group.submit(x)) for x in ("b", "c")]
    await _settle()
    store.gates[0].set()
    await _settle()
    assert store.batches == [["a"], ["b", "c"]]  # after a batch of one, the next began at once
    return calls


async def test_after_a_full_batch_the_next_begins_a_period_after_it_with_what_came_meanwhile():
    store = GatedStore()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10,
                                               spacing=BatchSpacing(period_s=0.3, from_items=2))
    calls = await _a_full_batch_in_flight(group, store)
    calls.append(asyncio.create_task(group.submit("d")))  # queued while ["b", "c"] is written
    await _settle()
    store.gates[1].set()
    await _settle()
    assert [await call for call in calls[:3]] == ["A", "B", "C"]  # answered before the wait
    calls.append(asyncio.create_task(group.submit("e")))  # arrives during the wait: goes with "d"
    while len(store.gates) < 3:
        await asyncio.sleep(0.01)
    store.gates[2].set()
    assert await asyncio.wait_for(asyncio.gather(*calls[3:]), 2.0) == ["D", "E"]
    assert store.batches == [["a"], ["b", "c"], ["d", "e"]]
    assert store.gap_s(2, 1) >= 0.29 and group.stats.spaced == 1  # (asyncio may fire a timer a clock tick early)


async def test_a_writer_that_finds_nothing_queued_after_a_full_batch_leaves_the_next_caller_unspaced():
    store = GatedStore()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10,
                                               spacing=BatchSpacing(period_s=5.0, from_items=2))
    calls = await _a_full_batch_in_flight(group, store)
    store.gates[1].set()
    assert [await call for call in calls] == ["A", "B", "C"]
    late = asyncio.create_task(group.submit("d"))
    await _settle()
    store.gates[2].set()
    assert await asyncio.wait_for(late, 1.0) == "D"
    assert store.gap_s(2, 1) < 1.0 and group.stats.spaced == 0


async def test_without_a_spacing_or_after_a_small_batch_the_next_begins_at_once():
    for spacing in (None, BatchSpacing(period_s=5.0, from_items=3)):
        store = GatedStore()
        group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10, spacing=spacing)
        calls = await _a_full_batch_in_flight(group, store)
        calls.append(asyncio.create_task(group.submit("d")))
        await _settle()
        store.gates[1].set()
        await _settle()
        store.gates[2].set()
        assert await asyncio.wait_for(asyncio.gather(*calls), 1.0) == ["A", "B", "C", "D"]
        assert store.batches[2] == ["d"] and store.gap_s(2, 1) < 1.0 and group.stats.spaced == 0


async def test_a_caller_that_cannot_spare_the_spacing_is_taken_without_it():
    """Queued before the wait with 1 s left: no wait at all. Queued during a wait with 1 s left:
    the wait ends for it. Either way it is written and answered, not refused for lack of time."""
    store = GatedStore()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10, answer_reserve=lambda _: 0.0,
                                               spacing=BatchSpacing(period_s=5.0, from_items=2))
    calls = await _a_full_batch_in_flight(group, store)
    calls.append(asyncio.create_task(group.submit("d", time_left_s=1.0)))
    await _settle()
    store.gates[1].set()
    await _settle()
    assert store.batches[2] == ["d"] and group.stats.spaced == 0  # taken at once
    calls += [asyncio.create_task(group.submit(x)) for x in ("e", "f")]
    await _settle()
    store.gates[2].set()  # after a batch of one: ["e", "f"] at once
    await _settle()
    assert store.batches == [["a"], ["b", "c"], ["d"], ["e", "f"]]
    calls.append(asyncio.create_task(group.submit("g")))  # no deadline: it can wait
    await _settle()
    store.gates[3].set()
    await _settle()
    assert len(store.began) == 4 and group.stats.spaced == 1  # the wait for "g" under way
    calls.append(asyncio.create_task(group.submit("h", time_left_s=1.0)))
    while len(store.gates) < 5:
        await asyncio.sleep(0.01)
    store.gates[4].set()
    assert await asyncio.wait_for(asyncio.gather(*calls), 1.0) == ["A", "B", "C", "D", "E", "F", "G", "H"]
    assert store.batches[4] == ["g", "h"] and store.gap_s(4, 3) < 1.0 and group.stats.refused == 0


def test_a_spacing_needs_a_period_and_a_batch_size():
    with pytest.raises(ValueError, match="period_s >= 0 and from_items >= 1"):
        BatchSpacing(period_s=0.1, from_items=0)
    with pytest.raises(ValueError, match="period_s >= 0 and from_items >= 1"):
        BatchSpacing(period_s=-1.0, from_items=2)


async def test_writers_write_batches_at_once_but_never_one_key_in_two_of_them():
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10, key=lambda item: item[0],
                                               writers=2)
    first = [asyncio.create_task(group.submit("x1"))]
    await _settle()
    first.append(asyncio.create_task(group.submit("x2")))  # x is in flight: it waits
    await _settle()
    first.append(asyncio.create_task(group.submit("y1")))  # a second batch, beside the first
    await _settle()
    assert store.batches == [["x1"], ["y1"]]
    store.release.set()
    assert await asyncio.gather(*first) == ["X1", "X2", "Y1"]
    assert store.batches == [["x1"], ["y1"], ["x2"]]


class LowestDraw:
    """An rng whose uniform(a, b) is a: the pacer's jitter out of the way."""

    @staticmethod
    def uniform(a: float, b: float) -> float:
        return a


def test_refused_callers_are_given_slots_one_after_another_at_the_rate_batches_are_written():
    """The pacer measures 100 items a second of writing (two batches of 50 in 0.5 s each) and hands
    the callers refused one after another slots 1/(100 x overbook) apart, the first refused first,
    none sooner than PACE_MIN_S; the time a batch took, not the time between batches, is the rate."""
    now = [0.0]
    pacer = RetryPacer(clock=lambda: now[0], rng=LowestDraw())  # type: ignore[arg-type]
    assert pacer.rate() == PACE_INITIAL_RATE
    pacer.written(50, 0.5)
    now[0] += 3.0  # idle between batches: not counted against the rate
    pacer.written(50, 0.5)
    assert pacer.rate() == pytest.approx(100.0)
    waits = [pacer.retry_after_s() for _ in range(300)]
    step = 1.0 / (100.0 * PACE_OVERBOOK)
    assert waits[0] == PACE_MIN_S
    assert waits == pytest.approx([PACE_MIN_S + i * step for i in range(300)])
    assert pacer.stats.paced == 300 and pacer.backlog_s() == pytest.approx(PACE_MIN_S + 300 * step)


def test_slots_past_the_longest_wait_are_not_taken_and_the_rate_follows_the_recent_batches():
    """With slots running PACE_MAX_S ahead a refused caller is told about PACE_MAX_S and takes no
    slot (it asks again then); batches older than PACE_WINDOW_S no longer count; a very slow
    writer still gets PACE_MIN_RATE."""
    now = [0.0]
    pacer = RetryPacer(clock=lambda: now[0], rng=LowestDraw())  # type: ignore[arg-type]
    pacer.written(1, 1.0)  # 1 a second: the floor
    assert pacer.rate() == PACE_MIN_RATE
    while pacer.stats.capped == 0:
        assert pacer.retry_after_s() <= PACE_MAX_S
    assert pacer.stats.paced == int((PACE_MAX_S - PACE_MIN_S) * PACE_MIN_RATE * PACE_OVERBOOK) + 1
    backlog = pacer.backlog_s()
    assert pacer.retry_after_s() == PACE_MAX_S and pacer.backlog_s() == backlog  # no slot taken
    assert pacer.stats.capped == 2
    now[0] += PACE_WINDOW_S + 1
    pacer.written(200, 1.0)
    assert pacer.rate() == pytest.approx(200.0)  # the old batch fell out of the window


async def test_a_caller_the_group_commit_refuses_is_told_the_pacers_slot():
    store = Store()
    pacer = RetryPacer(rng=LowestDraw())  # type: ignore[arg-type]
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10, pacer=pacer)
    inflight = asyncio.create_task(group.submit("a"))
    await _settle()
    group._write = MovingAverage(10.0)
    for expected in (PACE_MIN_S, PACE_MIN_S + 1 / (PACE_INITIAL_RATE * PACE_OVERBOOK)):
        with pytest.raises(Unavailable, match="nothing was written") as refused:
            await group.submit("b", time_left_s=1.0)
        assert refused.value.retry_after_ms == pytest.approx(expected * 1000, abs=5)
    store.release.set()
    assert await inflight == "A"
    assert pacer.stats.paced == 2 and len(pacer._batches) == 1  # the written batch was measured


@pytest.mark.parametrize("time_left_s", [None, 30.0])
async def test_a_caller_that_goes_away_once_its_item_is_taken_still_has_it_written(time_left_s: float | None):
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    caller = asyncio.create_task(outcome_or_alone(group, "a", time_left_s))
    await _settle()
    assert store.batches == [["a"]]  # taken: in the batch being written
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):  # the caller's own cancellation goes on
        await caller
    store.release.set()
    assert await group.submit("b") == "B"
    assert store.batches == [["a"], ["b"]] and group.stats.items == 2  # "a" was written with its batch


@pytest.mark.parametrize("time_left_s", [None, 30.0])
@pytest.mark.parametrize("fail_with", [None, RuntimeError("the batch did not commit")])
async def test_left_is_told_of_a_caller_gone_once_taken_with_a_future_settled_as_its_batch_ends(
        time_left_s: float | None, fail_with: Exception | None):
    """Whoever speaks for a gone caller (its audit entry) learns when its batch ended, committed
    or not; a caller gone before its batch was formed is not told (its item is not written)."""
    store = Store(fail_with=fail_with)
    told: list[tuple[str, asyncio.Future]] = []
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10,
                                               left=lambda item, ended: told.append((item, ended)))
    taken = asyncio.create_task(outcome_or_alone(group, "a", time_left_s))
    await _settle()
    queued = asyncio.create_task(outcome_or_alone(group, "b", time_left_s))
    await _settle()
    for caller in (taken, queued):
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert [item for item, _ in told] == ["a"] and not told[0][1].done()  # its batch is being written
    store.release.set()
    await _settle()
    assert told[0][1].done() and store.batches == [["a"]]  # "b" left unwritten


@pytest.mark.parametrize("time_left_s", [None, 30.0])
async def test_left_is_not_told_of_a_caller_cancelled_once_its_batch_ended(time_left_s: float | None):
    """Cancelled after its batch answered it but before it ran again: the batch is over, so what
    became of the item is known; a future told then was never settled (its audit waited for good)."""
    told: list[str] = []
    caller: asyncio.Task | None = None

    async def commit(batch: list[str]) -> list[str]:
        asyncio.get_running_loop().call_soon(caller.cancel)  # before the caller's wakeup
        return [item.upper() for item in batch]

    group: GroupCommit[str, str] = GroupCommit("test", commit, batch_max=10,
                                               left=lambda item, ended: told.append(item))
    caller = asyncio.create_task(outcome_or_alone(group, "a", time_left_s))
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert told == [] and group.stats.items == 1


async def test_left_is_not_told_of_a_caller_whose_writer_was_stopped():
    told: list[str] = []
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10,
                                               left=lambda item, ended: told.append(item))
    inflight = asyncio.create_task(outcome_or_alone(group, "a"))
    await _settle()
    for writer in list(group._writers):
        writer.cancel()
    assert await inflight is ALONE and told == []  # it goes on alone: nobody else speaks for it


async def test_left_is_told_of_a_caller_answered_late_while_its_batch_writes():
    """Answered UNAVAILABLE (its batch may still land it): its audit waits for the batch too."""
    told: list[tuple[str, asyncio.Future]] = []
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10, answer_reserve=lambda t: 0.0,
                                               left=lambda item, ended: told.append((item, ended)))
    with pytest.raises(Unavailable, match="had not committed"):
        await outcome_or_alone(group, "a", 0.05)
    assert [item for item, _ in told] == ["a"] and not told[0][1].done()
    store.release.set()
    await _settle()
    assert told[0][1].done() and store.batches == [["a"]]


async def test_a_caller_whose_writer_is_stopped_decides_alone():
    store = Store()
    group: GroupCommit[str, str] = GroupCommit("test", store.commit, batch_max=10)
    inflight = asyncio.create_task(outcome_or_alone(group, "a"))
    await _settle()
    queued = asyncio.create_task(outcome_or_alone(group, "b"))
    await _settle()
    for writer in list(group._writers):
        writer.cancel()
    assert await inflight is ALONE and await queued is ALONE  # not cancelled: each goes alone


async def test_by_member_answers_each_item_by_its_id_within_the_context_given():
    inside: list[bool] = []
    entered = contextvars.ContextVar("entered", default=False)

    @contextmanager
    def marked():
        token = entered.set(True)
        try:
            yield
        finally:
            entered.reset(token)

    async def commit(batch: list[str]) -> dict[int, str | Exception]:
        inside.append(entered.get())
        return {id(item): FailedPrecondition(f"{item} is refused") if item.startswith("bad") else item.upper()
                for item in batch if not item.startswith("other")}

    group = GroupCommit("t", by_member(commit, within=marked), batch_max=10)
    results = await asyncio.gather(*(outcome_or_alone(group, item) for item in ("a", "bad", "other", "b")),
                                   return_exceptions=True)
    assert results[0] == "A" and results[3] == "B"
    assert isinstance(results[1], FailedPrecondition)
    assert results[2] is ALONE  # left out by the commit: its caller goes alone
    assert inside == [True]  # one batch, committed within the context
