"""controller.admission: a bounded number inside, a bounded queue, the rest refused UNAVAILABLE
with a retry time that grows with the queue; a caller that would wait longer than its deadline
leaves is refused RESOURCE_EXHAUSTED at once instead of timing out in the queue."""
from __future__ import annotations

import asyncio
from dataclasses import replace
import random

import pytest

from controller.admission import MAX_RETRY_S, MIN_RETRY_S, AdmissionGate, QueueState, Refusal, MovingAverage, judge
from controller.errors import ResourceExhausted, Unavailable


def _gate(concurrency: int, max_waiting: int) -> AdmissionGate:
    return AdmissionGate("agent registrations", concurrency, max_waiting, rng=random.Random(7))


async def _hold(gate: AdmissionGate, release: asyncio.Event, time_left_s: float | None = None) -> None:
    """Enter the gate and stay inside until `release`."""
    async with gate.admit(time_left_s):
        await release.wait()


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

    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(gate, release))
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
    gate._turn = MovingAverage(0.2)
    short = gate.retry_after_s()
    gate._waiting = 400
    long = gate.retry_after_s()
    assert MIN_RETRY_S <= short < long <= MAX_RETRY_S
    gate._waiting = 1_000_000
    assert gate.retry_after_s() == MAX_RETRY_S


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        AdmissionGate("x", 0, 1)


# inside, waiting, concurrency, max_waiting, service_s, turn_s, turn_dev_s, time left T (None: no
# deadline) -> verdict. Once every slot is taken an arriving caller has k = (waiting + 1) /
# concurrency services ahead, each clearing in turn_s (measured from earlier waits, give or take
# turn_dev_s); it is refused when k x (turn + deviation) > T - max(2 x service, 0.1 x T).
JUDGEMENTS = [
    pytest.param(0, 0, 8, 256, 0.3, 0.3, 0.1, 0.01, None, id="a free slot: in, whatever the deadline"),
    pytest.param(7, 0, 8, 256, 5.0, 5.0, 1.0, 1.0, None, id="one slot of 8 free: in"),
    pytest.param(8, 0, 8, 256, 0.3, 0.3, 0.0, 10.0, None, id="all busy, none queued: 0.04 s of 9 s"),
    pytest.param(8, 230, 8, 256, 0.3, 0.3, 0.0, 10.0, None, id="230 queued at 0.3 s: 8.66 s within 9 s"),
    pytest.param(8, 255, 8, 256, 0.3, 0.3, 0.0, 10.0, Refusal.DEADLINE,
                 id="255 queued: 9.6 s beyond 9 s (the count-only queue let it in to time out)"),
    pytest.param(8, 100, 8, 256, 0.3, 0.3, 0.0, 5.0, None, id="5 s deadline, 100 queued: 3.79 s within 4.4 s"),
    pytest.param(8, 130, 8, 256, 0.3, 0.3, 0.0, 5.0, Refusal.DEADLINE, id="130 queued: 4.91 s beyond 4.4 s"),
    pytest.param(8, 100, 8, 256, 0.3, 0.3, 0.1, 5.0, Refusal.DEADLINE,
                 id="100 queued, deviation 0.1 s a place: 5.05 s beyond 4.4 s"),
    pytest.param(8, 100, 8, 256, 0.3, 0.45, 0.0, 5.0, Refusal.DEADLINE,
                 id="places clear slower than a service (a busy loop): 5.68 s beyond 4.4 s"),
    pytest.param(8, 10, 8, 256, 0.3, 0.3, 0.1, None, None, id="no deadline: only the queue bound"),
    pytest.param(8, 256, 8, 256, 0.3, 0.3, 0.1, None, Refusal.QUEUE_FULL, id="queue full, no deadline"),
    pytest.param(8, 256, 8, 256, 0.001, 0.001, 0.0, 60.0, Refusal.QUEUE_FULL, id="queue full beats a roomy deadline"),
    pytest.param(1, 0, 1, 1000, 0.5, 0.5, 0.0, 0.4, Refusal.DEADLINE, id="less time left than one service"),
    pytest.param(1, 3, 1, 1000, 0.1, 0.1, 0.0, 0.65, None, id="4 services ahead: 0.4 s within 0.45 s"),
    pytest.param(1, 5, 1, 1000, 0.1, 0.1, 0.0, 0.65, Refusal.DEADLINE, id="6 services ahead: 0.6 s beyond 0.45 s"),
    pytest.param(1, 0, 1, 0, 0.1, 0.1, 0.0, 10.0, Refusal.QUEUE_FULL, id="no queue at all: busy means refused"),
]


@pytest.mark.parametrize(
    "inside, waiting, concurrency, max_waiting, service_s, turn_s, turn_dev_s, time_left_s, verdict", JUDGEMENTS)
def test_admission_is_judged_by_expected_wait_against_the_deadline(
        inside: int, waiting: int, concurrency: int, max_waiting: int, service_s: float, turn_s: float,
        turn_dev_s: float, time_left_s: float | None, verdict: Refusal | None) -> None:
    state = QueueState(inside, waiting, concurrency, max_waiting, service_s, turn_s, turn_dev_s)
    assert judge(state, time_left_s) is verdict


class _Seen:
    def __init__(self) -> None:
        self.admitted: list[float] = []
        self.refused: list[str] = []
        self.abandoned = 0
        self.late = 0

    def admission_admitted(self, waited_s: float) -> None:
        self.admitted.append(waited_s)

    def admission_refused(self, reason: str) -> None:
        self.refused.append(reason)

    def admission_abandoned(self) -> None:
        self.abandoned += 1

    def admission_late(self) -> None:
        self.late += 1


async def test_a_caller_that_would_outwait_its_deadline_is_refused_at_once_with_a_retry_time() -> None:
    seen = _Seen()
    gate = AdmissionGate("agent registrations", 1, 1000, rng=random.Random(7), observer=seen)
    gate._service_s, gate._turn = 0.5, MovingAverage(0.5)
    release = asyncio.Event()

    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(_hold(gate, release, 10.0)) for _ in range(3)]  # 0.5, 1.0, 1.5 s expected: within 10 s
    await asyncio.sleep(0)
    assert gate.waiting == 3
    with pytest.raises(ResourceExhausted) as refused:
        async with gate.admit(time_left_s=2.0):  # 4 x 0.5 s expected > 2.0 - 2 x 0.5 s
            pass
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms >= MIN_RETRY_S * 1000
    assert "expected wait (2s, 3 waiting) is longer than the call's deadline leaves (2s)" in refused.value.message
    assert seen.refused == ["deadline"] and gate.refused == 1 and gate.waiting == 3
    release.set()
    await asyncio.gather(first, *queued)
    assert len(seen.admitted) == 4 and seen.abandoned == 0


@pytest.mark.parametrize("time_left_s, then_s, late", [
    pytest.param(None, 0.0, False, id="no deadline: cancelled while the gate let it wait: abandoned"),
    pytest.param(1.0, 0.0, False, id="its refusal not due yet: abandoned"),
    pytest.param(1.0, 1.0, True, id="its refusal due already, the loop stalled past it: late"),
])
async def test_a_caller_cancelled_in_the_queue_is_abandoned_or_late(
        time_left_s: float | None, then_s: float, late: bool) -> None:
    """gRPC cancels a queued caller (its deadline passed, or it went away). If its WAITED_OUT
    refusal was due by then (by the gate's clock) and had not run, the event loop was stalled past
    the gate's reserve: `late`, the loop's doing; otherwise the gate let it wait: `abandoned`."""
    now = [100.0]
    seen = _Seen()
    gate = AdmissionGate("agent registrations", 1, 10, clock=lambda: now[0], observer=seen)
    release = asyncio.Event()

    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(_hold(gate, release, time_left_s))
    await asyncio.sleep(0)
    assert gate.waiting == 1
    now[0] += then_s
    waiter.cancel()  # what gRPC does to a handler whose deadline passed
    await asyncio.gather(waiter, return_exceptions=True)
    expected = (1, 0) if late else (0, 1)
    assert (gate.late, gate.abandoned) == expected and (seen.late, seen.abandoned) == expected
    assert gate.waiting == 0
    release.set()
    await first


def test_the_time_a_place_takes_and_its_deviation_follow_what_was_measured() -> None:
    turn = MovingAverage(0.05)
    for _ in range(60):
        turn.add(0.2)
    assert turn.mean == pytest.approx(0.2, abs=1e-4) and turn.deviation < 1e-4
    for seconds in (0.1, 0.3) * 30:
        turn.add(seconds)
    assert turn.deviation > 0.05


async def test_a_queued_caller_whose_turn_does_not_come_in_time_is_refused_before_its_deadline() -> None:
    """The estimate said it would fit (the queue was fast so far); the slot is held longer: the
    caller is refused when only its own service time is left, not cancelled at its deadline."""
    seen = _Seen()
    gate = AdmissionGate("agent registrations", 1, 10, rng=random.Random(7), observer=seen)
    gate._service_s, gate._turn = 0.01, MovingAverage(0.001)
    release = asyncio.Event()

    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as refused:
        async with gate.admit(time_left_s=0.05):
            pass
    assert "turn did not come in the 0.05s its deadline left" in refused.value.message
    assert refused.value.retry_after_ms is not None
    assert seen.refused == ["waited_out"] and gate.abandoned == 0 and gate.waiting == 0
    assert gate.state().turn_s > 0.001  # what it waited teaches the estimate
    release.set()
    await first


def test_a_lagging_event_loop_leaves_less_of_the_deadline_to_wait() -> None:
    """4 services ahead at 0.1 s fit a 0.65 s deadline on a quick loop; on one whose timers fire
    0.2 s late the refusal would come too late, so the caller is refused at once."""
    quick = QueueState(1, 3, 1, 1000, 0.1, 0.1, 0.0)
    assert judge(quick, 0.65) is None
    assert judge(replace(quick, lag_s=0.2), 0.65) is Refusal.DEADLINE


def test_the_gate_keeps_the_loops_recent_lag_with_its_spikes() -> None:
    gate = AdmissionGate("agent registrations", 1, 10)
    assert gate.lag_s() == 0.0 and gate.answer_reserve_s(2.0) == pytest.approx(0.2)
    for seconds in (0.0, 0.0, 0.0, 0.5) * 10:  # a long stretch of work every fourth tick
        gate.loop_lagged(seconds)
    assert gate.lag_s() > 0.5  # an answer due now may be that late
    assert gate.state().lag_s == gate.lag_s() and gate.answer_reserve_s(2.0) == pytest.approx(0.2 + gate.lag_s())


async def test_close_refuses_the_queued_and_the_arriving_callers_unavailable() -> None:
    seen = _Seen()
    gate = AdmissionGate("agent registrations", 1, 10, observer=seen)
    release = asyncio.Event()
    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(_hold(gate, release, t)) for t in (None, 30.0)]
    await asyncio.sleep(0)
    assert gate.waiting == 2
    gate.close("the controller is shutting down")
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, Unavailable) and "shutting down" in o.message and "nothing was written" in o.message
               for o in outcomes), outcomes
    with pytest.raises(Unavailable):
        async with gate.admit(pass_when_full=True):
            pass
    assert gate.waiting == 0 and gate.abandoned == 0 and seen.abandoned == 0
    release.set()
    await first  # the caller inside finishes its work


async def test_a_caller_that_passes_when_full_is_never_refused_for_the_queue_but_waits_its_turn_otherwise() -> None:
    gate = AdmissionGate("agent registrations", 1, 1)
    release = asyncio.Event()
    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    second = asyncio.create_task(_hold(gate, release))  # the one place in the queue
    await asyncio.sleep(0)
    with pytest.raises(Unavailable):  # the queue is full: an ordinary caller is refused
        async with gate.admit():
            pass
    async with gate.admit(pass_when_full=True):  # it goes in without a slot
        assert gate.waiting == 1
    release.set()
    await asyncio.gather(first, second)
    entered = asyncio.Event()

    async def passing() -> None:
        async with gate.admit(pass_when_full=True):
            entered.set()

    release.clear()
    first = asyncio.create_task(_hold(gate, release))
    await asyncio.sleep(0)
    later = asyncio.create_task(passing())  # room in the queue: it queues like anyone
    await asyncio.sleep(0)
    assert gate.waiting == 1 and not entered.is_set()
    release.set()
    await asyncio.gather(first, later)
    assert entered.is_set()
