"""The run loop pauses after a whole-cluster pass as long as that pass took (a join storm must
not turn the event loop into back-to-back snapshots), and not after a pass that did less."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controller.reconcile import pacing, reconciler
from controller.reconcile import Reconciler, ReconcileOutcome
from controller.store.turns import WritePriority, WriterTurns


async def _publish(nodes: set[str], deleted: list[Any]) -> None:
    pass


@pytest.mark.parametrize("full", [True, False])
async def test_a_whole_cluster_pass_is_followed_by_a_pause_as_long_as_it(monkeypatch, full: bool) -> None:
    monkeypatch.setattr(pacing, "PASS_PERIOD_S", 0.0)  # the period has a test of its own
    r = Reconciler(None, push=lambda nodes: None, publish=_publish, interval_s=0.001, settle_s=0.0)  # type: ignore[arg-type]
    passes: list[float] = []
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def one_pass(*, force: bool = False, wait_published: bool = True) -> ReconcileOutcome:  # what the real pass records
        began = pacing.time.perf_counter()
        await real_sleep(0.05)  # the pass's own work
        if full:
            r._full.passes += 1
            r._full_pass_s = pacing.time.perf_counter() - began
        else:
            r._full_pass_s = 0.0
        passes.append(r._full_pass_s)
        if len(passes) == 3:
            raise asyncio.CancelledError
        return ReconcileOutcome()

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(r, "reconcile_once", one_pass)
    monkeypatch.setattr(reconciler.asyncio, "sleep", sleep)
    r.wake()
    with pytest.raises(asyncio.CancelledError):
        await r.run()
    if full:
        assert len(pauses) >= 2 and all(p >= 0.05 for p in pauses[-2:])
        assert pauses[-2:] == passes[:2]
    else:
        assert not [p for p in pauses if p > 0.01]


async def test_publishes_overlap_the_next_pass_but_keep_the_commits_order() -> None:
    """The run loop does not wait for watchers to be told (reading the views costs round trips):
    publishes run in the background, one after the other, in the order of the commits; one that
    fails is logged and the next ones still run."""
    told: list[str] = []

    async def publish(changed: set[str], deleted: list[Any]) -> None:
        (name,) = changed
        if name == "first":
            await asyncio.sleep(0.05)  # slower than the ones after it
        if name == "broken":
            raise RuntimeError("the watchers' read failed")
        told.append(name)

    r = Reconciler(None, push=lambda nodes: None, publish=publish)  # type: ignore[arg-type]
    for name in ("first", "broken", "second", "third"):
        r._publisher.publish_in_order({name}, [])
    assert told == []  # nothing waited for
    await r.published()
    assert told == ["first", "second", "third"]


@pytest.mark.parametrize("warm", [False, True])
async def test_a_wake_during_a_pass_starts_the_next_at_once_and_one_while_idle_settles_first(monkeypatch,
                                                                                             warm: bool) -> None:
    """The settle lets a burst land before a pass reads the whole cluster; a wake that came while
    a pass ran finds its burst landed already: the next pass starts without it (an arrival waits
    one pass less). With a warm cache a pass costs the changes, not the cluster: an arrival (a
    64-shard gang) woken into an idle loop is not held back by the settle either."""
    monkeypatch.setattr(pacing, "PASS_PERIOD_S", 0.0)  # the period has a test of its own
    r = Reconciler(None, push=lambda nodes: None, publish=_publish, interval_s=60.0, settle_s=0.05)  # type: ignore[arg-type]
    if warm:
        r._warm.cache = object()  # type: ignore[assignment]  # what the pass decides on is warm
    passes, sleeps = await _two_passes(r, monkeypatch)
    assert passes == 2
    assert sleeps == ([] if warm else [0.05])  # the settle before the first pass only, when cold


async def _two_passes(r: Reconciler, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[float]]:
    """Run `r`'s loop, woken while idle, for two passes, the first woken again while it runs (a
    submit lands); the passes run and what the loop slept (no time passes in those sleeps)."""
    passes = 0
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def one_pass(*, force: bool = False, wait_published: bool = True) -> ReconcileOutcome:
        nonlocal passes
        passes += 1
        if passes == 1:
            r.wake()  # a submit lands while the pass runs
            await real_sleep(0)
            return ReconcileOutcome()
        raise asyncio.CancelledError

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(r, "reconcile_once", one_pass)
    monkeypatch.setattr(reconciler.asyncio, "sleep", sleep)
    loop = asyncio.get_running_loop()
    loop.call_soon(r.wake)  # woken while idle (the loop waits for it)
    with pytest.raises(asyncio.CancelledError):
        await r.run()
    return passes, sleeps



async def test_a_pass_starts_a_period_after_the_last_one_began_and_the_first_at_once(monkeypatch) -> None:
    """Passes back to back took a core at 50 submits a second: the next one waits for what is
    left of `PASS_PERIOD_S` since the last one began, and deploys what arrived meanwhile."""
    monkeypatch.setattr(pacing, "PASS_PERIOD_S", 60.0)
    r = Reconciler(None, push=lambda nodes: None, publish=_publish, interval_s=60.0, settle_s=0.0)  # type: ignore[arg-type]
    r._warm.cache = object()  # type: ignore[assignment]  # warm: no settle
    passes, sleeps = await _two_passes(r, monkeypatch)
    assert passes == 2
    assert len(sleeps) == 1 and 50.0 < sleeps[0] <= 60.0  # none before the first; the period's rest before the second


class _Db:
    def __init__(self, turns: WriterTurns) -> None:
        self.turns = turns


def _period_just_over() -> float:
    """When the last pass began for the next one to wait for answered batches alone: the period
    over, the bound (`ANSWER_YIELD_MAX_S`, an hour in these tests) all ahead. (A pass begun an
    hour ago left the bound 0.1 s ahead: a test stalled that long on a loaded machine saw the
    pass go at once, no batch waited for.)"""
    return pacing.time.perf_counter() - pacing.PASS_PERIOD_S


async def test_a_pass_waits_while_answered_batches_are_written_at_most_the_bound(monkeypatch) -> None:
    """A submit batch on its way to SQLite's writer (`WriterTurns.intend`) is written before the
    next pass starts, which then decides its arrivals; not after `ANSWER_YIELD_MAX_S` past the
    period since the last pass began (a long pass, at saturation, is followed at once)."""
    r = Reconciler(None, push=lambda nodes: None, publish=_publish)  # type: ignore[arg-type]
    turns = WriterTurns()
    r._state.db = _Db(turns)  # type: ignore[assignment]
    long_ago = pacing.time.perf_counter() - 3600.0  # the period and the bound are over

    monkeypatch.setattr(pacing, "ANSWER_YIELD_MAX_S", 3600.0)
    with turns.intend():
        room = asyncio.create_task(r._make_room(_period_just_over()))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not room.done()  # the batch is still on its way
    await asyncio.wait_for(room, 10)

    monkeypatch.setattr(pacing, "ANSWER_YIELD_MAX_S", 1800.0)
    with turns.intend():
        await asyncio.wait_for(r._make_room(long_ago), 10)  # the last pass began past the bound: no wait
        await asyncio.wait_for(r._make_room(None), 10)  # no pass before: at once


async def test_a_pass_waiting_for_an_answered_batch_goes_when_its_turn_ends(monkeypatch) -> None:
    """The pass waiting for a submit batch at SQLite's writer goes on when the batch's turn
    ends, woken by it (`WriterTurns.wait_until_not_answering`): within a few turns of the loop,
    no timer (a poll every 2 ms left it waiting up to a poll's period after the batch)."""
    r = Reconciler(None, push=lambda nodes: None, publish=_publish)  # type: ignore[arg-type]
    turns = WriterTurns()
    r._state.db = _Db(turns)  # type: ignore[assignment]
    monkeypatch.setattr(pacing, "ANSWER_YIELD_MAX_S", 3600.0)
    await turns.acquire(WritePriority.ANSWER)  # the batch writes
    room = asyncio.create_task(r._make_room(_period_just_over()))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not room.done()
    turns.release()  # the batch committed
    for _ in range(5):
        await asyncio.sleep(0)
    assert room.done()
    room.result()
