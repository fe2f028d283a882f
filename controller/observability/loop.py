"""How busy the controller's event loop is: the lag of a short timer.

Every request, agent stream and background loop of the controller shares one asyncio event
loop; Python work on it (a whole-cluster read, a plan commit's checks) delays all of them. A
timer asked for every `every_s` fires late by as long as the loop was busy with other work
when it was due: that lateness, observed continuously, is the wait every other task saw too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

LAG_TICK_S = 0.1


async def watch_event_loop(observe: Callable[[float], None], every_s: float = LAG_TICK_S) -> None:
    """Until cancelled: `observe(seconds late)` for a timer of `every_s`, again and again."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(every_s)
        observe(max(0.0, time.perf_counter() - asked - every_s))
