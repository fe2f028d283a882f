"""controller.aio: bounded waits that never swallow a cancellation (Python 3.11's wait_for does,
CPython gh-86296), a shutdown that never waits forever on a task, a leader's periodic passes, and
the stop signals' handlers."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from controller.aio import (
    cancel_and_wait, in_own_thread, leader_passes, on_stop_signals, stopped_ignoring_sigterm, wait_event, within)


async def _waiter(event: asyncio.Event) -> None:
    while True:
        await wait_event(event, 5.0)
        event.clear()


async def test_a_cancel_that_arrives_as_the_event_fires_ends_the_waiting_loop() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(_waiter(event))
    await asyncio.sleep(0.01)
    event.set()
    await asyncio.sleep(0)  # the event's waiter is now done, the loop has not yet resumed
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2.0)
    assert task in done and task.cancelled()


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True


async def test_within_bounds_an_awaitable_and_returns_its_result() -> None:
    assert await within(asyncio.sleep(0, result=7), 1.0) == 7
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(10), 0.01)


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_the_first(caplog) -> None:
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(10)  # the second cancellation ends it

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="maia.aio"):
        await cancel_and_wait([task], patience_s=0.05)
    assert swallowed.is_set() and task.cancelled()
    assert "stubborn" in caplog.text


async def test_cancel_and_wait_gives_up_on_a_task_that_never_stops(caplog) -> None:
    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="maia.aio"):
        await cancel_and_wait([task], patience_s=0.02)
    assert not task.done() and "immortal" in caplog.text
    release.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_leader_passes_run_while_leading_and_go_on_after_a_failure(caplog) -> None:
    class Deposed(Exception):
        pass

    leading = [False]
    outcomes: list[BaseException | None] = [RuntimeError("the database went away"), Deposed(), None]
    ran: list[str] = []

    async def one_pass() -> None:
        outcome = outcomes.pop(0) if outcomes else None
        ran.append(type(outcome).__name__)
        if outcome is not None:
            raise outcome

    task = asyncio.create_task(leader_passes(0.01, lambda: leading[0], one_pass, what="a test pass",
                                             quiet=(Deposed,)))
    try:
        await asyncio.sleep(0.05)
        assert ran == []  # a follower runs none
        leading[0] = True
        while len(ran) < 4:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert ran[:3] == ["RuntimeError", "Deposed", "NoneType"]  # each failure, then the next on time
    failures = [r for r in caplog.records if "a test pass failed" in r.getMessage()]
    assert len(failures) == 1 and "the database went away" in (failures[0].exc_text or str(failures[0].exc_info))


@pytest.fixture
def signals_restored() -> Iterator[None]:
    """The test process's SIGINT and SIGTERM dispositions, put back after the test."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


async def test_stop_signals_reach_the_loop_until_sigterm_is_ignored_from_any_thread(signals_restored: None) -> None:
    """SIGINT and SIGTERM call the callback on the loop with the signal, SIGTERM also when another
    thread took it (the loop is woken, not left asleep until its next timer); once the stop is
    under way a SIGTERM is ignored (the process lives, nothing is called)."""
    loop = asyncio.get_running_loop()
    heard: asyncio.Queue[signal.Signals] = asyncio.Queue()
    on_stop_signals(loop, heard.put_nowait)
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(heard.get(), 5.0) == signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(heard.get(), 5.0) == signal.SIGTERM
    parked, release = threading.Event(), threading.Event()
    other = threading.Thread(target=lambda: (parked.set(), release.wait(10.0)))
    other.start()
    parked.wait(5.0)
    try:
        assert other.ident is not None
        signal.pthread_kill(other.ident, signal.SIGTERM)  # its C handler runs there, the Python one on main
        assert await asyncio.wait_for(heard.get(), 5.0) == signal.SIGTERM
    finally:
        release.set()
        other.join()
    stopped_ignoring_sigterm(loop)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.2)
    assert heard.empty() and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


async def test_sigterm_goes_from_its_handler_to_ignored_never_through_the_default_action(
        signals_restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default action for SIGTERM kills the process: a SIGTERM racing a clean stop (a parent's,
    as the process ended itself) in an instant when it was set killed a gateway (exit -15). From
    the handler to SIG_IGN, no disposition set on the way is SIG_DFL (the loop's own removal of a
    handler sets it)."""
    set_for_sigterm: list[object] = []
    real = signal.signal

    def recorded(sig: int, handler: object) -> object:
        if sig == signal.SIGTERM:
            set_for_sigterm.append(handler)
        return real(sig, handler)  # type: ignore[arg-type]

    monkeypatch.setattr(signal, "signal", recorded)
    loop = asyncio.get_running_loop()
    on_stop_signals(loop, lambda _: None)
    on_stop_signals(loop, lambda _: None)  # the controller's second handler (its stop deadline's)
    stopped_ignoring_sigterm(loop)
    assert set_for_sigterm and set_for_sigterm[-1] is signal.SIG_IGN
    assert signal.SIG_DFL not in set_for_sigterm


def test_a_sigterm_once_the_loop_is_closed_without_the_hand_over_kills_as_the_default_would(tmp_path) -> None:
    """A start or a stop that ended without `stopped_ignoring_sigterm` (an exception): a SIGTERM
    then was swallowed (the loop it was handed to was closed), where the loop's own handlers,
    given back at its close, let it kill the process. It kills it (exit -15)."""
    import subprocess
    import sys

    script = (
        "import asyncio, os, signal, time\n"
        "from controller.aio import on_stop_signals\n"
        "async def main():\n"
        "    on_stop_signals(asyncio.get_running_loop(), lambda _: None)\n"
        "asyncio.run(main())\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('survived')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and "survived" not in done.stdout, (done.returncode, done.stderr)


async def test_in_own_thread_gives_the_result_or_the_exception_and_holds_no_executor_thread() -> None:
    """A long wait in its own thread leaves the loop's default executor free (one that held a
    thread of it per agent gateway starved `asyncio.to_thread`); its result and its exception (a
    `subprocess.TimeoutExpired` the gateways' stop catches) reach the awaiting task."""
    release = threading.Event()
    waiting = asyncio.ensure_future(in_own_thread(release.wait, name="test-wait"))
    await asyncio.sleep(0)
    workers = min(32, (os.cpu_count() or 1) + 4)
    every_thread = threading.Barrier(workers, timeout=10)  # passed only with the whole pool at once
    await asyncio.gather(*(asyncio.to_thread(every_thread.wait) for _ in range(workers)))
    assert any(t.name == "test-wait" for t in threading.enumerate())
    release.set()
    assert await waiting is True

    def refuse() -> None:
        raise subprocess.TimeoutExpired("gateway", 1.0)

    with pytest.raises(subprocess.TimeoutExpired):
        await in_own_thread(refuse, name="test-refuse")
