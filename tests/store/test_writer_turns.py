"""SQLite writers' turns by priority (`controller.store.turns`): the most urgent waiter goes when
the writer is free, in arrival order among equals, an aged waiter before any younger one, and a
waiter cancelled while waiting (or just after its turn was given) never keeps the writer; the
same across the event loops of several threads, whose engines on one file share the turns."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from controller.store.db import SqliteWriters, process_turns
from controller.store.turns import WritePriority, WriterTurns, metered_turns, write_priority


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _wait_queued(turns: WriterTurns, count: int) -> None:
    while turns.waiting() < count:
        await asyncio.sleep(0)


async def _write(turns: WriterTurns, order: list[str], name: str, priority: WritePriority | None = None) -> None:
    """Take the turn (at `priority`, else the task's), note it, give it back."""
    await turns.acquire(priority)
    order.append(name)
    turns.release()


async def test_the_most_urgent_waiter_goes_first_then_arrival_order() -> None:
    turns = WriterTurns(clock=Clock())
    await turns.acquire(WritePriority.BACKGROUND)
    order: list[str] = []

    tasks = []
    for n, (name, priority) in enumerate([("report-1", WritePriority.BACKGROUND), ("pass", WritePriority.SCHEDULE),
                                          ("report-2", WritePriority.BACKGROUND), ("submit-1", WritePriority.ANSWER),
                                          ("submit-2", WritePriority.ANSWER)]):
        tasks.append(asyncio.create_task(_write(turns, order, name, priority)))
        await _wait_queued(turns, n + 1)
    turns.release()
    await asyncio.gather(*tasks)
    assert order == ["submit-1", "submit-2", "pass", "report-1", "report-2"]
    assert not turns.held


@pytest.mark.parametrize("intent", [False, True])
async def test_an_aged_waiter_goes_before_younger_urgent_ones(intent: bool) -> None:
    """Also while an ANSWER writer is on its way (`intend`): the writer is never kept from an aged one."""
    clock = Clock()
    turns = WriterTurns(aged_s=0.5, clock=clock)
    await turns.acquire(WritePriority.ANSWER)
    order: list[str] = []

    report = asyncio.create_task(_write(turns, order, "report", WritePriority.BACKGROUND))
    await _wait_queued(turns, 1)
    clock.now = 0.4
    submit = asyncio.create_task(_write(turns, order, "submit", WritePriority.ANSWER))
    await _wait_queued(turns, 2)
    clock.now = 0.6  # the report has waited 0.6 s, the submit 0.2 s
    with turns.intend() if intent else contextlib.nullcontext():
        turns.release()
        await asyncio.gather(report, submit)
    assert order == ["report", "submit"]


async def test_the_task_priority_is_the_default_and_a_free_writer_is_taken_at_once() -> None:
    turns = WriterTurns(clock=Clock())
    await turns.acquire()  # free: no wait, whatever the priority
    order: list[str] = []

    background = asyncio.create_task(_write(turns, order, "background"))  # the task's priority
    await _wait_queued(turns, 1)
    with write_priority(WritePriority.ANSWER):
        answer = asyncio.create_task(_write(turns, order, "answer"))  # the task copies the context
    await _wait_queued(turns, 2)
    turns.release()
    await asyncio.gather(background, answer)
    assert order == ["answer", "background"]


async def test_a_waiter_cancelled_while_waiting_or_just_after_its_turn_never_keeps_the_writer() -> None:
    turns = WriterTurns(clock=Clock())
    await turns.acquire(WritePriority.BACKGROUND)
    gone = asyncio.create_task(turns.acquire(WritePriority.ANSWER))
    await _wait_queued(turns, 1)
    gone.cancel()  # cancelled while waiting: leaves the queue
    await asyncio.gather(gone, return_exceptions=True)
    assert turns.waiting() == 0

    granted = asyncio.create_task(turns.acquire(WritePriority.ANSWER))
    await _wait_queued(turns, 1)
    later: list[str] = []
    report = asyncio.create_task(_write(turns, later, "report", WritePriority.BACKGROUND))
    await _wait_queued(turns, 2)
    turns.release()  # the turn goes to `granted`...
    granted.cancel()  # ...which is cancelled before it runs: it passes the turn on
    await asyncio.gather(granted, return_exceptions=True)
    await report
    assert later == ["report"]
    assert not turns.held


async def test_sqlite_writers_take_turns_by_the_task_priority(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    # No waiter ages here: under load the report waited longer than AGED_S before the commit and
    # went first as the aged one (failed once in a loaded run); aging has a test of its own.
    writers = SqliteWriters(turns=WriterTurns(aged_s=3600.0))
    writers.attach(engine)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x TEXT)"))
        order: list[str] = []

        async def write(name: str, priority: WritePriority) -> None:
            with write_priority(priority):
                async with engine.begin() as conn:
                    await conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": name})
                    order.append(name)

        async with engine.connect() as first:
            await first.execute(text("INSERT INTO t VALUES ('first')"))  # holds the turn until it returns
            turns = writers.turns
            report = asyncio.create_task(write("report", WritePriority.BACKGROUND))
            await _wait_queued(turns, 1)
            submit = asyncio.create_task(write("submit", WritePriority.ANSWER))
            await _wait_queued(turns, 2)
            await first.commit()
        await asyncio.gather(report, submit)
        assert order == ["submit", "report"]
        async with engine.connect() as conn:
            assert list(await conn.scalars(text("SELECT x FROM t ORDER BY rowid"))) == ["first", "submit", "report"]
    finally:
        await engine.dispose()


async def test_metered_turns_add_up_the_waits_and_name_the_holder() -> None:
    clock = Clock()
    turns = WriterTurns(clock=clock)

    async def metered_write() -> tuple[float, int, WritePriority | None]:
        with write_priority(WritePriority.ANSWER), metered_turns() as meter:
            await turns.acquire()  # held by the pass below: waits until it is given
            turns.release()
            await turns.acquire()  # free now: no wait
            turns.release()
        return meter.waited_s, meter.waits, meter.behind

    await turns.acquire(WritePriority.BACKGROUND)
    turns.release()  # a free writer taken and given back: nothing metered outside
    await turns.acquire(WritePriority.SCHEDULE)
    writer = asyncio.create_task(metered_write())
    await _wait_queued(turns, 1)
    clock.now = 0.25
    turns.release()
    assert await writer == (0.25, 1, WritePriority.SCHEDULE)


class _OtherLoop:
    """An event loop on a thread of its own (as the reconciler's, `scheduling/own_loop.py`)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="other", daemon=True)
        self._thread.start()

    def start(self, coro: Any) -> asyncio.Future[Any]:
        """`coro` as a task there, awaitable from the caller's loop."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def test_turns_are_shared_by_the_loops_of_several_threads_in_priority_order() -> None:
    turns = WriterTurns(clock=Clock())
    other = _OtherLoop()
    try:
        order: list[str] = []
        threads: dict[str, str] = {}

        async def write(name: str, priority: WritePriority) -> None:
            await turns.acquire(priority)
            order.append(name)
            threads[name] = threading.current_thread().name
            await asyncio.sleep(0.01)  # holds the turn across a turn of its loop
            turns.release()

        await turns.acquire(WritePriority.BACKGROUND)  # held here, on the test's loop
        report = other.start(write("report", WritePriority.BACKGROUND))
        await _wait_queued(turns, 1)
        passes = other.start(write("pass", WritePriority.SCHEDULE))
        await _wait_queued(turns, 2)
        submit = asyncio.create_task(write("submit", WritePriority.ANSWER))
        await _wait_queued(turns, 3)
        turns.release()  # from this thread: the other loop's waiters are woken on their loop
        await asyncio.wait_for(asyncio.gather(report, passes, submit), 10)
        assert order == ["submit", "pass", "report"]
        assert threads == {"submit": threading.current_thread().name, "pass": "other", "report": "other"}
        assert not turns.held and turns.waiting() == 0
    finally:
        other.close()


async def test_a_turn_given_to_a_waiter_of_another_loop_as_it_is_cancelled_is_passed_on() -> None:
    turns = WriterTurns(clock=Clock())
    other = _OtherLoop()
    try:
        await turns.acquire(WritePriority.BACKGROUND)
        started = threading.Event()

        async def wait_then_get_cancelled() -> None:
            task = asyncio.current_task()
            assert task is not None
            started.set()
            await turns.acquire(WritePriority.ANSWER)

        doomed = asyncio.run_coroutine_threadsafe(wait_then_get_cancelled(), other.loop)
        await _wait_queued(turns, 1)
        later: list[str] = []
        report = asyncio.create_task(_write(turns, later, "report", WritePriority.BACKGROUND))
        await _wait_queued(turns, 2)
        # Given to the other loop's waiter and cancelled there before its loop runs it: the
        # cancellation is queued on that loop first, the grant after it.
        other.loop.call_soon_threadsafe(doomed.cancel)
        turns.release()
        await asyncio.wait_for(report, 10)
        assert later == ["report"]
        assert doomed.cancelled()
        assert not turns.held
    finally:
        other.close()


async def test_engines_on_one_sqlite_file_share_turns_and_in_memory_ones_do_not(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"
    assert process_turns(url) is process_turns(f"sqlite+aiosqlite:///{tmp_path / '.' / 'w.db'}")
    assert process_turns(url) is not process_turns(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
    assert process_turns("sqlite+aiosqlite://") is not process_turns("sqlite+aiosqlite://")


async def test_two_threads_write_one_sqlite_file_by_turns_without_the_busy_handler(tmp_path: Path) -> None:
    """Each thread its own engine (connections belong to one loop), both on one file: their
    writers take the same turns, so none ever waits in SQLite's busy handler (timeout 0 here:
    a race for the lock would fail at once with "database is locked")."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"

    def engine() -> Any:
        made = create_async_engine(url, connect_args={"timeout": 0})
        SqliteWriters(turns=process_turns(url)).attach(made)
        return made

    async def writes(name: str, count: int) -> None:
        made = engine()
        try:
            for n in range(count):
                async with made.begin() as conn:
                    await conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": f"{name}-{n}"})
                    await asyncio.sleep(0)  # holds the write lock across a turn of its loop
                    await conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": f"{name}-{n}b"})
        finally:
            await made.dispose()

    setup = engine()
    async with setup.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x TEXT)"))
    other = _OtherLoop()
    try:
        await asyncio.gather(writes("here", 40), other.start(writes("there", 40)))
        async with setup.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM t")) == 160
    finally:
        other.close()
        await setup.dispose()


async def test_a_free_writer_is_kept_for_an_answer_writer_on_its_way_until_it_asks() -> None:
    """A pass asking while a submit batch reads (`intend`) waits for the batch's transaction,
    rather than the batch waiting for the pass's whole commit."""
    turns = WriterTurns(clock=Clock())
    order: list[str] = []
    with turns.intend():
        assert turns.answering()  # on its way: nothing holds the writer or waits for it yet
        commit = asyncio.create_task(_write(turns, order, "pass", WritePriority.SCHEDULE))
        await _wait_queued(turns, 1)
        await asyncio.sleep(0)
        assert order == [] and not turns.held  # free, but kept for the batch
        await turns.acquire(WritePriority.ANSWER)  # the batch's first write: taken at once
        order.append("batch")
        turns.release()
        # the pass's at once, the batch's block still open: its first write took the intent back
        assert turns.held and turns.waiting() == 0
    await commit
    assert order == ["batch", "pass"]
    assert not turns.held and not turns.answering()


async def test_an_intent_withdrawn_without_writing_hands_the_writer_on() -> None:
    turns = WriterTurns(clock=Clock())
    order: list[str] = []
    with turns.intend():  # a batch whose members were all refused: it never writes
        report = asyncio.create_task(_write(turns, order, "report", WritePriority.BACKGROUND))
        await _wait_queued(turns, 1)
        await asyncio.sleep(0)
        assert order == []
    await report
    assert order == ["report"] and not turns.held


async def test_an_intent_keeps_the_writer_from_waiters_of_another_loop() -> None:
    turns = WriterTurns(clock=Clock())
    other = _OtherLoop()
    try:
        order: list[str] = []
        with turns.intend():
            passes = other.start(_write(turns, order, "pass", WritePriority.SCHEDULE))
            await _wait_queued(turns, 1)
            await asyncio.sleep(0.01)
            assert order == []
            await _write(turns, order, "batch", WritePriority.ANSWER)
        await asyncio.wait_for(passes, 10)
        assert order == ["batch", "pass"]
    finally:
        other.close()


async def _turns_of_the_loop(times: int = 5) -> None:
    """Let the loop run `times` turns: what is woken by a resolved future goes; no timer fires."""
    for _ in range(times):
        await asyncio.sleep(0)


async def test_a_wait_for_no_answer_writer_ends_when_the_answer_turn_is_released() -> None:
    """The reconciler's yield to submit batches (`wait_until_not_answering`) goes on when the
    batch's turn ends, woken by the release: no poll, no timer between the release and it."""
    turns = WriterTurns(clock=Clock())
    assert await turns.wait_until_not_answering(3600.0)  # nobody answering: at once
    await turns.acquire(WritePriority.ANSWER)
    waiting = asyncio.create_task(turns.wait_until_not_answering(3600.0))
    await _turns_of_the_loop()
    assert not waiting.done()
    turns.release()
    await _turns_of_the_loop()
    assert waiting.done() and waiting.result() is True


async def test_a_wait_for_no_answer_writer_goes_on_while_others_hold_the_writer() -> None:
    """Only ANSWER writers are waited for: a report flush holding the writer is not, and an
    ANSWER waiter behind it is, until it has written."""
    turns = WriterTurns(clock=Clock())
    await turns.acquire(WritePriority.BACKGROUND)
    assert await turns.wait_until_not_answering(3600.0)
    batch = asyncio.create_task(_write(turns, [], "batch", WritePriority.ANSWER))
    await _wait_queued(turns, 1)
    waiting = asyncio.create_task(turns.wait_until_not_answering(3600.0))
    await _turns_of_the_loop()
    assert not waiting.done()
    turns.release()  # the batch's turn, then the batch's release
    await batch
    await _turns_of_the_loop()
    assert waiting.result() is True


async def test_a_wait_for_no_answer_writer_ends_when_an_intent_is_taken_back_or_a_waiter_leaves() -> None:
    turns = WriterTurns(clock=Clock())
    with turns.intend():  # a batch reading, then refused whole: it never writes
        waiting = asyncio.create_task(turns.wait_until_not_answering(3600.0))
        await _turns_of_the_loop()
        assert not waiting.done()
    await _turns_of_the_loop()
    assert waiting.result() is True

    await turns.acquire(WritePriority.BACKGROUND)
    batch = asyncio.create_task(turns.acquire(WritePriority.ANSWER))
    await _wait_queued(turns, 1)
    waiting = asyncio.create_task(turns.wait_until_not_answering(3600.0))
    await _turns_of_the_loop()
    assert not waiting.done()
    batch.cancel()  # a batch whose caller went away while it waited
    await _turns_of_the_loop()
    assert waiting.result() is True and turns.held
    turns.release()


async def test_a_wait_for_no_answer_writer_gives_up_after_its_bound() -> None:
    turns = WriterTurns(clock=Clock())
    await turns.acquire(WritePriority.ANSWER)
    assert await turns.wait_until_not_answering(0.01) is False
    assert await turns.wait_until_not_answering(0.0) is False
    turns.release()
    assert turns._watchers == []  # nothing left behind by the waits that gave up


async def test_a_wait_for_no_answer_writer_is_woken_on_its_loop_by_a_release_on_another() -> None:
    """The reconciler on a loop of its own (`own_thread`) waits for batches written on the
    controller's."""
    turns = WriterTurns(clock=Clock())
    other = _OtherLoop()
    try:
        await turns.acquire(WritePriority.ANSWER)
        waiting = other.start(turns.wait_until_not_answering(3600.0))
        while not turns._watchers:
            await asyncio.sleep(0)
        assert not waiting.done()
        turns.release()
        assert await asyncio.wait_for(waiting, 10) is True
    finally:
        other.close()
