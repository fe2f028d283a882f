"""The event loop's lag: what a busy loop makes every other task wait."""

from __future__ import annotations

import asyncio
import time

from controller.observability.loop import watch_event_loop


async def test_a_loop_held_by_blocking_work_is_seen_late_by_that_long() -> None:
    seen: list[float] = []
    watcher = asyncio.create_task(watch_event_loop(seen.append, every_s=0.01))
    try:
        await asyncio.sleep(0.05)  # some ticks on an idle loop
        time.sleep(0.3)  # the loop held by work that does not yield
        await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
    assert seen and max(seen) >= 0.25  # the tick due while the loop was held came that late
    assert all(lag >= 0 for lag in seen)
