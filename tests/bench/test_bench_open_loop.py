"""The open-loop load of `bench e2e --rate` / `bench submit --rate`: arrivals at their times,
never waiting for answers, and the controller's histogram read as Prometheus's
histogram_quantile does. Never its times (those are for docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import random

import pytest

from bench.e2e import arrival_offsets, bucket_quantile, interpolated_quantile, middle_rate, open_loop


def test_even_arrivals_are_one_over_the_rate_apart() -> None:
    assert arrival_offsets(4, 8.0, False, random.Random(1)) == [0.0, 0.125, 0.25, 0.375]


def test_poisson_arrivals_come_at_the_rate_on_average_with_uneven_gaps() -> None:
    offsets = arrival_offsets(20_000, 100.0, True, random.Random(3))
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert 95.0 < len(gaps) / offsets[-1] < 105.0
    assert len({round(g, 9) for g in gaps}) > len(gaps) // 2  # not evenly spaced


async def test_the_open_loop_sends_every_call_without_waiting_for_the_earlier_answers() -> None:
    """Each call waits until the last one was sent: a closed loop (or a sender awaiting its
    calls) would never send the second."""
    everyone_sent = asyncio.Event()
    sent: list[int] = []

    async def send(i: int) -> None:
        sent.append(i)
        if len(sent) == 5:
            everyone_sent.set()
        await everyone_sent.wait()

    late_ms: list[float] = []
    await asyncio.wait_for(open_loop([0.0, 0.0, 0.001, 0.001, 0.002], send, late_ms), timeout=30)
    assert sent == [0, 1, 2, 3, 4] and len(late_ms) == 5 and min(late_ms) >= 0.0


def test_the_quantile_is_interpolated_within_its_bucket() -> None:
    buckets = {0.01: 50.0, 0.02: 90.0, 0.05: 99.0, float("inf"): 100.0}
    assert interpolated_quantile(buckets, {}, 0.5) == 0.01
    assert abs(interpolated_quantile(buckets, {}, 0.7) - 0.015) < 1e-12  # halfway through (0.01, 0.02]
    assert interpolated_quantile(buckets, {}, 0.995) == 0.05  # in +Inf: the last finite bound
    assert bucket_quantile(buckets, {}, 0.7) == 0.02
    assert interpolated_quantile(buckets, buckets, 0.5) is None  # nothing observed since
    assert abs(interpolated_quantile(buckets, {0.01: 50.0, 0.02: 50.0, 0.05: 50.0, float("inf"): 50.0}, 0.5)
               - 0.01625) < 1e-12  # of the 50 since: none <= 0.01, 40 in (0.01, 0.02]: 25/40 of the way


def test_the_steady_rate_leaves_out_the_pipeline_filling_and_draining() -> None:
    """A run whose middle ran at 100/s after a slow first second and before a slow last one: the
    steady rate is the middle's, the first-to-last rate lower; too few times give none."""
    filling = [i * 0.1 for i in range(10)]                    # 10 in the first second
    middle = [1.0 + i * 0.01 for i in range(80)]              # 80 at 100/s
    draining = [1.8 + 0.1 * (i + 1) for i in range(10)]       # 10 in the last second
    times = filling + middle + draining
    assert middle_rate(times) == pytest.approx(100.0, rel=0.02)
    assert len(times) / (max(times) - min(times)) < 40
    assert middle_rate([3.0, 1.0, 2.0], share=1.0) == pytest.approx(1.0)  # unsorted times are sorted
    assert middle_rate([]) is None and middle_rate([1.0]) is None and middle_rate([2.0, 2.0]) is None
