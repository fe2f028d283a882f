"""A coroutine on a thread of its own, with an event loop of its own.

The reconcile loop runs there when asked (`Reconciler(own_thread=True)`; the default on
PostgreSQL until its submit p99 at 50/s was measured lower with the passes on the controller's
loop, docs/benchmarks.md `ownloop`). On the controller's event loop each of a pass's statements
(a round trip to PostgreSQL, a trip to aiosqlite's thread) waits for its turn behind the
callbacks of the agent streams and the RPCs, and the pass's own CPU delays every RPC; on a loop
of its own a statement's answer waits only for the GIL (handed over within
`sys.getswitchinterval()`, 5 ms), but the pass's Python still takes the interpreter from the
controller's loop, and its pushes and publishes cross between the loops. The lease renewal runs
this way always (`controller.leadership`): it must not wait behind a busy loop.

`OwnLoop.run` is awaited on the controller's loop: it starts the thread, runs the work there
until it ends or `run` is cancelled, then cancels the work, waits (bounded) for the thread to
end, and raises what the work raised. `call` and `to_main` hand a callback from either loop to
the other; `on_main` awaits a coroutine on the controller's loop from the thread's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from controller.aio import call_soon_from_thread

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long `run` waits for the thread to end once it is cancelled (a pass cut at its next await;
# a decision or re-check in a worker thread finishes first).
STOP_WAIT_S = 10.0


class OwnLoop:
    def __init__(self, name: str, *, stop_wait_s: float = STOP_WAIT_S) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()  # created here, run by the thread
        self._main: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop_wait_s = stop_wait_s

    def call(self, callback: Callable[..., object], *args: object) -> None:
        """`callback(*args)` on the thread's loop, from any thread."""
        call_soon_from_thread(self.loop, callback, *args)

    def to_main(self, callback: Callable[..., object], *args: object) -> None:
        """`callback(*args)` on the controller's loop (the one `run` is awaited on)."""
        call_soon_from_thread(self._main, callback, *args)

    async def on_main(self, work: Awaitable[T]) -> T:
        """Await `work` on the controller's loop, from the thread's (cancelled with the caller)."""
        assert self._main is not None, "OwnLoop.run is not running"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(work), self._main))

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """`work()` on the thread's loop until it ends (its error raised here) or this is cancelled."""
        self._main = asyncio.get_running_loop()
        ended = asyncio.Event()
        failed: list[BaseException] = []

        def serve() -> None:
            try:
                with asyncio.Runner(loop_factory=lambda: self.loop) as runner:
                    runner.run(self._until_stopped(work))
            except BaseException as exc:  # reported by `run`, on the controller's loop
                failed.append(exc)
            finally:
                call_soon_from_thread(self._main, ended.set)

        thread = threading.Thread(target=serve, name=self.name, daemon=True)
        thread.start()
        try:
            await ended.wait()
        finally:
            self._stopping.set()
            task = self._task
            if task is not None:
                self.call(task.cancel)
            await asyncio.to_thread(thread.join, self._stop_wait_s)
            if thread.is_alive():
                log.warning("the %s thread did not stop within %.0f s; leaving it (a daemon)", self.name,
                            self._stop_wait_s)
        if failed:
            raise failed[0]

    async def _until_stopped(self, work: Callable[[], Awaitable[None]]) -> None:
        self._task = asyncio.current_task()  # before the check: `run` sees the task or the task sees the stop
        if self._stopping.is_set():
            return
        try:
            await work()
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise


async def _awaited(work: Awaitable[T]) -> T:
    return await work
