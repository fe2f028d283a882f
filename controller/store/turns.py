"""Turns at SQLite's single writer, given by priority, first come first served within one.

`db.SqliteWriters` makes this process's writing transactions take turns (SQLite lets one
connection write at a time). In arrival order, a short transaction that a caller waits for (a
submit batch, answered when it commits) queued behind every report flush of thousands of agents
and behind the reconciler's plan commits, each holding the writer for tens of milliseconds, and
the reconciler's commit behind all of those (docs/benchmarks.md, 2026-12-01 evening, `gang2`).
Here a transaction waiting for its turn says how urgent it is (`write_priority`, a context
variable its task sets; the default is `WritePriority.BACKGROUND`):
- `ANSWER`: batches whose callers wait for the commit (submits, deletions);
- `SCHEDULE`: the reconciler's passes (a deployment is placed when its plan commits);
- `BACKGROUND`: everything else (agents' reports, registers, hellos, the background loops).
When the writer is free the most urgent waiter goes, the earliest first among equals. No waiter
starves: one that has waited `AGED_S` or longer counts as the most urgent (the earliest of those
first), so under a stream of urgent writers the others still go within about `AGED_S` plus one
transaction (a report flush waits at most that much longer than in arrival order); a writer
that saturates the database degrades to arrival order.

A turn cannot be taken from a transaction that holds it, so a submit batch that asked for its
turn after its read (its first write) waited for whatever began meanwhile: a plan commit or a
report flush that took the free writer during the batch's read and held it for tens of
milliseconds. A task that will write soon says so (`intend`, the submit batch, from its start):
until it asks for its turn or leaves, a free writer is not given to a less urgent waiter that
has not aged. The writer may idle meanwhile, for the read at most.

A task that wants to know how long its transactions waited for their turn (the submit batch,
for its latency's split) meters them (`metered_turns`): each wait adds to its `TurnWait`. One that
gives way to ANSWER writers (the reconciler, before a pass) waits until there are none
(`wait_until_not_answering`), woken when the turns change rather than polling them.

The turns are the process's, not one event loop's: the reconciler can write from a thread with
an event loop of its own (`scheduling/own_loop.py`; only with `Reconciler(own_thread=True)`, not
the default: measured slower, docs/benchmarks.md, 2026-12-01 night 2 and `ownloop`), so a waiter
is woken on its own loop
(`call_soon_threadsafe` when the turn is given from another thread) and the queue is guarded by
a thread lock held only while it is read or changed, never while a turn is awaited.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

# A waiter this old goes before any younger one, whatever its priority. At 0.5 s the agents'
# report flushes (one batch at a time) fell behind at 100 submits/s on 4,096 nodes: placed ->
# RUNNING recorded p50 8.4 s against 2.2 s in arrival order (docs/benchmarks.md, `gang2`).
AGED_S = 0.1


class WritePriority(enum.IntEnum):
    ANSWER = 0
    SCHEDULE = 1
    BACKGROUND = 2


_PRIORITY: contextvars.ContextVar[WritePriority] = contextvars.ContextVar(
    "maia_write_priority", default=WritePriority.BACKGROUND)


@dataclass
class TurnWait:
    """What a task's transactions waited for their turns at the writer (`metered_turns`)."""

    waited_s: float = 0.0
    waits: int = 0  # turns that were not free at once
    # The priority of the writer that held the turn when the longest wait began (None: no wait).
    behind: WritePriority | None = None
    _longest_s: float = field(default=0.0, repr=False)

    def add(self, seconds: float, behind: WritePriority | None) -> None:
        self.waited_s += seconds
        self.waits += 1
        if seconds >= self._longest_s:
            self._longest_s, self.behind = seconds, behind


_METER: contextvars.ContextVar[TurnWait | None] = contextvars.ContextVar("maia_turn_wait", default=None)


@contextmanager
def write_priority(priority: WritePriority) -> Iterator[None]:
    """The transactions begun inside (in this task, and the tasks it starts) wait for their turn
    at the writer with `priority`."""
    token = _PRIORITY.set(priority)
    try:
        yield
    finally:
        _PRIORITY.reset(token)


def answering() -> AbstractContextManager[None]:
    """`write_priority(ANSWER)`: for the batches whose callers wait for their commit (submits,
    deletions), before reports and passes."""
    return write_priority(WritePriority.ANSWER)


def current_priority() -> WritePriority:
    return _PRIORITY.get()


@contextmanager
def metered_turns() -> Iterator[TurnWait]:
    """The waits for the writer's turn of the transactions begun inside (in this task, and the
    tasks it starts), added up in the `TurnWait` yielded."""
    meter = TurnWait()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


@dataclass(eq=False)
class _Waiter:
    priority: WritePriority
    since: float
    seq: int
    granted: asyncio.Future[None] = field(repr=False)
    given: bool = False  # the turn is this waiter's (set under the turns' lock)


def _resolve(future: asyncio.Future[None]) -> None:
    """Resolve `future` (a no-op when it was cancelled meanwhile: a waiter, seeing `given`, passes
    the turn on)."""
    if not future.done():
        future.set_result(None)


class WriterTurns:
    """A lock whose waiters go by priority (module docstring); for every event loop and thread of
    the process."""

    def __init__(self, *, aged_s: float = AGED_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._aged_s = aged_s
        self._clock = clock
        self._mutex = threading.Lock()  # guards the fields below; never held across an await
        self._held = False
        self._holder: WritePriority | None = None  # the priority the turn was given at (None: free)
        self._waiters: list[_Waiter] = []
        self._seq = 0
        self._intents = 0  # ANSWER writers on their way (`intend`)
        self._watchers: list[asyncio.Future[None]] = []  # `wait_until_not_answering`: resolved on a change

    @property
    def held(self) -> bool:
        return self._held

    def waiting(self) -> int:
        return len(self._waiters)

    def answering(self) -> bool:
        """Whether an ANSWER writer holds the turn, waits for it or is on its way (`intend`)."""
        with self._mutex:
            return self._answering()

    def _answering(self) -> bool:
        """`answering`, under the mutex."""
        return self._intents > 0 or self._holder is WritePriority.ANSWER or any(
            w.priority is WritePriority.ANSWER for w in self._waiters)

    async def wait_until_not_answering(self, timeout_s: float) -> bool:
        """Wait until no ANSWER writer holds the turn, waits for it or is on its way (`answering`),
        at most `timeout_s`; whether that came. Woken by each change that can end it (a turn
        released, an intent taken back, a waiter gone), on this task's own loop whatever thread
        made the change."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            with self._mutex:
                if not self._answering():
                    return True
                left = give_up - loop.time()
                if left <= 0:
                    return False
                change: asyncio.Future[None] = loop.create_future()
                self._watchers.append(change)
            try:
                await asyncio.wait([change], timeout=left)
            finally:
                with self._mutex:
                    if change in self._watchers:
                        self._watchers.remove(change)

    def _changed(self) -> None:
        """Wake the tasks waiting in `wait_until_not_answering` (they look again)."""
        with self._mutex:
            watchers, self._watchers = self._watchers, []
        for change in watchers:
            _resolve_on_its_loop(change)

    @contextmanager
    def intend(self) -> Iterator[None]:
        """An ANSWER writer on its way: the task inside reads, then writes (a submit batch). Until
        it asks for its turn (its first write, which takes the intent back) or leaves, a free
        writer is not given to a less urgent waiter that has not aged: a plan commit or a report
        flush starting during the batch's reads would hold the writer for a whole transaction
        while the batch, its callers waiting, waits for it. The writer idles meanwhile at most
        for the reads; an aged waiter still goes (module docstring). Tasks started inside do
        not take it back (they copy the context, not the task)."""
        intent = _Intent(self, asyncio.current_task())
        with self._mutex:
            self._intents += 1
        token = _INTENT.set(intent)
        try:
            yield
        finally:
            _INTENT.reset(token)
            if self._withdraw(intent):
                self._hand_on()
            if self._watchers:
                self._changed()

    def _withdraw(self, intent: _Intent) -> bool:
        """Take `intent` back (once); whether the free writer may now go to a held-back waiter."""
        with self._mutex:
            if not intent.open:
                return False
            intent.open = False
            self._intents -= 1
            return self._intents == 0 and not self._held and bool(self._waiters)

    async def acquire(self, priority: WritePriority | None = None) -> None:
        """Wait for the turn (at `priority`, by default the task's `write_priority`). Cancelled
        while waiting (a timeout), nothing is held; cancelled just after the turn was given, it
        is passed on."""
        priority = current_priority() if priority is None else priority
        loop = asyncio.get_running_loop()
        intent = _INTENT.get()
        with self._mutex:
            if intent is not None and intent.open and intent.turns is self and intent.task is asyncio.current_task():
                # asking now: no longer on its way (a task it started, with its context, is not it)
                intent.open = False
                self._intents -= 1
            if not self._held and not self._waiters and (priority is WritePriority.ANSWER or not self._intents):
                self._held, self._holder = True, priority
                return
            self._seq += 1
            waiter = _Waiter(priority, self._clock(), self._seq, loop.create_future())
            behind = self._holder
            self._waiters.append(waiter)
            free = not self._held
        if free:  # held back for an intent, or others are held back and this one may go
            self._hand_on()
        try:
            await waiter.granted
        except BaseException:
            with self._mutex:
                given = waiter.given
                if not given:
                    self._waiters.remove(waiter)
            if given:
                self.release()  # given the turn as it was cancelled: the next waiter's
            elif self._watchers:
                self._changed()
            raise
        meter = _METER.get()
        if meter is not None:
            meter.add(self._clock() - waiter.since, behind)

    def release(self) -> None:
        """Give the turn to the most urgent waiter (aged ones first), or free the writer. From any
        thread: the waiter is woken on its own loop."""
        with self._mutex:
            self._held, self._holder = False, None
        self._hand_on()
        if self._watchers:
            self._changed()

    def _next(self) -> _Waiter | None:
        """The waiter a free writer goes to (under the mutex): the most urgent, aged ones first;
        None while the writer is kept for an ANSWER writer on its way (`intend`)."""
        if not self._waiters:
            return None
        now = self._clock()
        nxt = min(self._waiters, key=lambda w: (w.priority if now - w.since < self._aged_s else -1, w.seq))
        if self._intents and nxt.priority is not WritePriority.ANSWER and now - nxt.since < self._aged_s:
            return None
        return nxt

    def _hand_on(self) -> None:
        """Give a free writer to the next waiter (`_next`), if any."""
        while True:
            with self._mutex:
                if self._held:
                    return
                nxt = self._next()
                if nxt is None:
                    return
                self._waiters.remove(nxt)
                nxt.given, self._held, self._holder = True, True, nxt.priority
            if _wake_on_its_loop(nxt):
                return
            with self._mutex:  # its loop is closed: nobody will take the turn there; the next waiter's
                self._held, self._holder = False, None


@dataclass(eq=False)
class _Intent:
    turns: WriterTurns
    task: asyncio.Task[Any] | None  # whose first write takes it back
    open: bool = True  # not yet taken back (its writer asked for its turn, or left)


_INTENT: contextvars.ContextVar[_Intent | None] = contextvars.ContextVar("maia_write_intent", default=None)


def _wake_on_its_loop(waiter: _Waiter) -> bool:
    """Wake `waiter` on its loop, at once when that is the running one; False when its loop is closed."""
    return _resolve_on_its_loop(waiter.granted)


def _resolve_on_its_loop(future: asyncio.Future[None]) -> bool:
    """Resolve `future` on its loop, at once when that is the running one; False when its loop is closed."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    loop = future.get_loop()
    if running is loop:
        _resolve(future)
        return True
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # closed
        return False
    return True
