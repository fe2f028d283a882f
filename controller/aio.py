"""Waiting and cancelling in asyncio without Python 3.11's traps.

`asyncio.wait_for` on 3.11 swallows a cancellation that arrives in the same loop iteration as
the awaited thing completes (CPython gh-86296, fixed in 3.12): a loop that waits on an event
with it and is cancelled just as someone sets the event never sees the cancellation, runs on,
and whoever awaits it after `cancel()` waits forever. That is how `ControllerApp.stop()` hung on a
loaded machine. Here every bounded wait goes through `asyncio.timeout`, which does not have the
bug, and shutdown cancels with a bound and says which task would not stop. And the leader's
periodic passes (`leader_passes`: the node lifecycle's, the event retention's).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
log = logging.getLogger("maia.aio")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passed; True when it was set."""
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """`await awaitable`, cancelled after `timeout_s` with TimeoutError (what `wait_for` does,
    without losing an outer cancellation)."""
    async with asyncio.timeout(max(0.0, timeout_s)):
        return await awaitable


def call_soon_from_thread(loop: asyncio.AbstractEventLoop | None, callback: Callable[..., object],
                          *args: object) -> None:
    """`callback(*args)` on `loop`, from any thread; nothing once that loop is closed (or None)."""
    if loop is None:
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # closed: it runs nothing any more
        pass


async def in_own_thread(call: Callable[[], T], *, name: str) -> T:
    """`call()` in a thread of its own, awaited: for a call that blocks for as long as something
    else lives (a child process's `wait`). In the loop's default executor (`asyncio.to_thread`)
    each such call held one of its few threads (min(32, cpus + 4): 6 on 2 cores) for good, and
    6 agent gateways' watchers left none for the solver, the reconciler's reads or GetVersion.
    Cancelling the await leaves the thread to end with its call (a daemon: never holds the exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # the await was cancelled
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        call_soon_from_thread(loop, settle, result, error)  # the loop closed meanwhile: nobody awaits it

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done


async def leader_passes(interval_s: float, leading: Callable[[], bool], one_pass: Callable[[], Awaitable[object]],
                        *, what: str, quiet: tuple[type[Exception], ...] = (), logger: logging.Logger = log) -> None:
    """A leader's periodic work until cancelled: every `interval_s`, `one_pass()` if `leading()`.
    A pass that fails is logged on `logger` (`what` names it) and the next one goes on time; the
    `quiet` exceptions (the lease lost: another controller leads now and does the work) are not."""
    while True:
        await asyncio.sleep(interval_s)
        if not leading():
            continue
        try:
            await one_pass()
        except asyncio.CancelledError:
            raise
        except quiet:
            continue
        except Exception:
            logger.exception("%s failed; the next in %.1fs", what, interval_s)


async def cancel_and_wait(tasks: Iterable[asyncio.Task], *, patience_s: float = 5.0) -> None:
    """Cancel `tasks` and wait for them to end. A task still running after `patience_s` is
    cancelled again (it swallowed the first) and named in the log; never waits forever."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    rounds = 0
    while pending:
        _, pending = await asyncio.wait(pending, timeout=patience_s)
        if not pending:
            break
        rounds += 1
        names = ", ".join(sorted(t.get_name() for t in pending))
        if rounds >= 3:
            log.error("tasks still running after %d cancellations; leaving them: %s", rounds, names)
            return
        log.warning("tasks ignored cancellation for %.0fs, cancelling again: %s", patience_s, names)
        for task in pending:
            task.cancel()
    for task in tasks:  # retrieve the outcomes so none is reported as "never retrieved"
        if task.done() and not task.cancelled():
            task.exception()


class Wakeup:
    """An event with one waiter (a stream's pusher): a flag, and a future only while it waits.
    asyncio.Event keeps a deque of waiters, ~0.6 KiB a stream."""

    __slots__ = ("is_set", "_waiter")

    def __init__(self) -> None:
        self.is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self.is_set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self.is_set = False

    async def wait(self) -> None:
        if self.is_set:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class PushedStream(Protocol):
    """A stream of requests that can hand its messages over as they arrive instead of being read.

    A relayed agent stream (controller/gateway/relay.py) receives its messages in frames, many
    streams' at once: read as an async iterator, each message wakes its reader's task (~1 event
    loop step a message); pushed, the frame's reader hands each to the consumer in one call.
    `push_to(take, ended)`: from now on each message (those waiting first) goes to `take`; the
    stream's end, or the first exception `take` raises, goes to `ended` (None: the sender ended
    the stream) and nothing more is taken. Returns the function that stops the pushing (the
    consumer is done). Whoever reads the stream uses `push_to` when it has it (`pushed`), and
    iterates it otherwise."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def push_to(self, take: Callable[[Any], None],
                ended: Callable[[BaseException | None], None]) -> Callable[[], None]: ...


def pushed(stream: object) -> PushedStream | None:
    """`stream` when it can push its messages (`PushedStream`), else None."""
    return stream if callable(getattr(stream, "push_to", None)) else None


def on_stop_signals(loop: asyncio.AbstractEventLoop, callback: Callable[[signal.Signals], object]) -> None:
    """`callback(the signal)` on `loop` at each SIGINT or SIGTERM (a later call replaces it).

    SIGINT goes through the loop's handlers; SIGTERM through a Python handler of the process that
    hands it to the loop, so that `stopped_ignoring_sigterm` swaps it for SIG_IGN in one step. The
    loop's own removal passes through the default action first (`remove_signal_handler` sets
    SIG_DFL): a parent's SIGTERM that arrived in that instant killed a gateway that was stopping
    cleanly (exit -15, once in CI). The handler runs on the main thread, woken by the loop's wakeup
    fd (set for SIGINT) whichever thread the signal reached."""
    def handed_to_loop(signum: int, frame: object) -> None:
        try:
            loop.call_soon_threadsafe(callback, signal.SIGTERM)
        except RuntimeError:  # the loop is closed (a start or stop that ended without its handlers'
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hand-over): what a closed loop's would do
            os.kill(os.getpid(), signal.SIGTERM)

    loop.add_signal_handler(signal.SIGINT, callback, signal.SIGINT)
    signal.signal(signal.SIGTERM, handed_to_loop)
    signal.siginterrupt(signal.SIGTERM, False)  # system calls resume after it, as with the loop's handlers


def stopped_ignoring_sigterm(loop: asyncio.AbstractEventLoop) -> None:
    """A process's stop is over, or under way on its own: a SIGTERM from now on (a supervisor's
    second, a parent's racing a stop the process began itself) has nothing left to hurry, and once
    the loop closes and gives its handlers back, the default action would kill the process on its
    way out (exit -15). SIGTERM is ignored from now on, its handler (`on_stop_signals`) replaced in
    one step, never through the default action; the loop's SIGINT handler goes."""
    loop.remove_signal_handler(signal.SIGTERM)  # one the loop held (none with `on_stop_signals`): a no-op
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop.remove_signal_handler(signal.SIGINT)
