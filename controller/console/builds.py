"""One console document built at a time per viewer, shared by every request waiting for it.

An open console reads `/api/state` again after every deployment change it is told of (debounced
200 ms in the page), so under load each browser asked several times a second, and each document
is a read of every node, placement and deployment (at 4,096 nodes and 10,000 deployments ~50 ms
of the event loop and ~0.3 s of a worker thread: docs/benchmarks.md, `consolecost`).
`SharedBuilds` answers each request with a document whose build started after the request
arrived (a page told of a change sees it), but one viewer's builds never overlap and start at
most one every `spacing_s`: the requests that arrive while one is under way, or sooner than that
after its start, share the next. However many consoles are open, a viewer's document costs at
most one build per `spacing_s`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

# The shortest time between the starts of two builds of one viewer's document.
STATE_SPACING_S = 2.0


def _retrieved(task: asyncio.Task[bytes]) -> None:
    """Marks a build's exception retrieved when every request waiting for it went away first."""
    if not task.cancelled():
        task.exception()


class SharedBuilds:
    """A document per key (the viewer's tenant), built by `build(key)` (module docstring)."""

    def __init__(self, build: Callable[[str], Awaitable[bytes]], *, spacing_s: float = STATE_SPACING_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._build = build
        self._spacing_s = spacing_s
        self._clock = clock
        self._next: dict[str, asyncio.Task[bytes]] = {}     # not started yet: new requests wait for it
        self._running: dict[str, asyncio.Task[bytes]] = {}  # started: new requests wait for the next
        self._started: dict[str, float] = {}
        self.builds = 0

    async def get(self, key: str) -> bytes:
        """A document of `key` whose build started after this call (the build's error, raised)."""
        task = self._next.get(key)
        if task is None or task.done():  # (done: cancelled before it started, by `close`)
            task = self._next[key] = asyncio.get_running_loop().create_task(self._run(key))
            task.add_done_callback(_retrieved)
        return await asyncio.shield(task)  # a request that goes away leaves the build to the others

    async def _run(self, key: str) -> bytes:
        running = self._running.get(key)
        if running is not None:
            await asyncio.wait([running])
        wait = self._started.get(key, -math.inf) + self._spacing_s - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
        this = self._running[key] = self._next.pop(key)
        self._started[key] = self._clock()
        self.builds += 1
        try:
            return await self._build(key)
        finally:
            if self._running.get(key) is this:
                del self._running[key]

    async def close(self) -> None:
        """Cancel the builds under way or waiting, and wait for them."""
        tasks = [*self._next.values(), *self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
