"""controller.admission: a bounded number inside, a bounded queue, the rest refused UNAVAILABLE
with a retry time that grows with the queue."""
from __future__ import annotations

import asyncio
import random

import pytest

from controller.admission import MAX_RETRY_S, MIN_RETRY_S, AdmissionGate
from controller.errors import Unavailable


def _gate(concurrency: int, max_waiting: int) -> AdmissionGate:
    return AdmissionGate("agent registrations", concurrency, max_waiting, rng=random.Random(7))


async def test_at_most_concurrency_callers_are_inside_and_the_queue_is_bounded() -> None:
    gate = _gate(concurrency=2, max_waiting=3)
    release = asyncio.Event()
    inside, most = 0, 0

    async def caller() -> str:
        nonlocal inside, most
        try:
            async with gate.admit():
                inside += 1
                most = max(most, inside)
                await release.wait()
                inside -= 1
        except Unavailable as exc:
            assert exc.retry_after_ms is not None and MIN_RETRY_S * 1000 <= exc.retry_after_ms <= MAX_RETRY_S * 1000
            assert "busy with agent registrations (3 waiting); retry in" in exc.message
            return "refused"
        return "served"

    tasks = [asyncio.create_task(caller()) for _ in range(8)]
    await asyncio.sleep(0.01)
    assert gate.waiting == 3
    release.set()
    outcomes = await asyncio.gather(*tasks)
    assert outcomes.count("served") == 5 and outcomes.count("refused") == 3
    assert most == 2 and gate.refused == 3 and gate.admitted == 5 and gate.waiting == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    gate = _gate(concurrency=1, max_waiting=1)
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.admit():
            await release.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(holder())
    await asyncio.sleep(0)
    assert gate.waiting == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.waiting == 0
    release.set()
    await first
    async with gate.admit():  # the slot came back
        pass


def test_the_retry_time_grows_with_the_queue_and_stays_bounded() -> None:
    gate = _gate(concurrency=4, max_waiting=10_000)
    gate._service_s = 0.2
    short = gate.retry_after_s()
    gate._waiting = 400
    long = gate.retry_after_s()
    assert MIN_RETRY_S <= short < long <= MAX_RETRY_S
    gate._waiting = 1_000_000
    assert gate.retry_after_s() == MAX_RETRY_S


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        AdmissionGate("x", 0, 1)
