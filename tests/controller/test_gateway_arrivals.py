"""A relayed call's queue of arrivals (`controller.gateway.frames.Arrivals`): messages in order,
then the end; and an idle call (an agent stream between its messages) holding no queue."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from controller.gateway.frames import Arrivals

IDLE_CALLS = 1000
# An idle call's Arrivals and its Wakeup take ~0.15 KiB; an empty deque alone is ~0.6 KiB.
IDLE_CALL_BYTES_MAX = 400


async def test_messages_come_in_order_then_the_end() -> None:
    arrivals = Arrivals()
    arrivals.put(b"a")
    arrivals.put(b"b")
    assert await arrivals.next() == b"a"
    assert await arrivals.next() == b"b"
    later = asyncio.create_task(arrivals.next())  # waits for the next one
    await asyncio.sleep(0)
    assert not later.done()
    arrivals.put(b"c")
    arrivals.end()
    assert await later == b"c"
    assert await arrivals.next() is None
    assert arrivals.take_waiting() == [] and arrivals.ended


async def test_the_waiting_messages_are_taken_at_once_and_the_queue_goes_on() -> None:
    arrivals = Arrivals()
    arrivals.put(b"a")
    arrivals.put(b"b")
    assert arrivals.take_waiting() == [b"a", b"b"]
    arrivals.put(b"c")
    assert await arrivals.next() == b"c"


async def test_an_idle_call_holds_no_queue() -> None:
    """16,384 agent streams hold one Arrivals each at both ends of the link: between messages,
    nothing of a queue stays."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        idle = [Arrivals() for _ in range(IDLE_CALLS)]
        for arrivals in idle:  # each had a message, taken
            arrivals.put(b"heartbeat")
            assert await arrivals.next() == b"heartbeat"
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / len(idle) < IDLE_CALL_BYTES_MAX
