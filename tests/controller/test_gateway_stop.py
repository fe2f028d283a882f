"""The agent gateways' stop deadline (`children.stop_grace_s`): it grows with the agent streams the
gateways hold, counts from the controller's stop's start, and stays inside the controller's own
shutdown deadline."""

from __future__ import annotations

import subprocess
import time

import pytest

from controller import main
from controller.api import server
from controller.gateway import children
from controller.gateway.children import GatewayProcesses, GatewaySettings, stop_grace_s


class FakeGateway:
    """A gateway process as `GatewayProcesses.stop` sees it: it records the grace it was given, and
    exits within it or not (`stops`)."""

    def __init__(self, pid: int, stops: bool = True) -> None:
        self.pid = pid
        self.stops = stops
        self.graces: list[float | None] = []
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return None if not self.signals else 0

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")

    def wait(self, timeout: float | None = None) -> int:
        self.graces.append(timeout)
        if timeout is not None and not self.stops:
            raise subprocess.TimeoutExpired("gateway", timeout)
        return 0


def gateways_of(*processes: FakeGateway) -> GatewayProcesses:
    gateways = GatewayProcesses(GatewaySettings(count=len(processes), listen="127.0.0.1:0", linger_ms=5.0))
    gateways.processes = list(processes)  # type: ignore[arg-type]
    return gateways


def test_the_grace_grows_with_the_streams_from_the_old_fixed_one_to_a_cap() -> None:
    assert stop_grace_s(0) == children.STOP_GRACE_S
    graces = [stop_grace_s(streams) for streams in (0, 1_024, 4_096, 8_192, 16_384, 1_000_000)]
    assert graces == sorted(graces) and len(set(graces)) == len(graces) - 1  # the last two both at the cap
    assert stop_grace_s(8_192) > 2 * children.STOP_GRACE_S > children.STOP_GRACE_S
    assert stop_grace_s(1_000_000) == children.STOP_GRACE_MAX_S


def test_the_cap_leaves_the_controllers_stop_inside_its_shutdown_deadline() -> None:
    """After the gateways: the lease's release and the database's disposal, each bounded."""
    assert (children.STOP_GRACE_MAX_S + server.RELEASE_TIMEOUT_S + server.DISPOSE_TIMEOUT_S
            < main.SHUTDOWN_DEADLINE_S)
    assert server.STREAMS_END_TIMEOUT_S + 2.0 + children.STOP_AFTER_SIGTERM_S <= children.STOP_GRACE_MAX_S


async def test_gateways_holding_many_streams_are_given_their_grace_before_the_kill() -> None:
    gateway = FakeGateway(101)
    gateways = gateways_of(gateway)
    gateways.stopping(16_384)
    await gateways.stop()
    assert gateway.signals == ["TERM"]
    [grace] = gateway.graces
    assert grace is not None and children.STOP_GRACE_S < grace <= stop_grace_s(16_384)


async def test_the_deadline_counts_from_the_stops_start_and_is_set_once() -> None:
    gateway = FakeGateway(101)
    gateways = gateways_of(gateway)
    gateways.stopping(0)
    gateways.stopping(16_384)  # a second call (the stop's own) moves nothing
    await gateways.stop()
    [grace] = gateway.graces
    assert grace is not None and grace <= children.STOP_GRACE_S


async def test_past_the_deadline_a_gateway_still_gets_a_moment_after_its_sigterm_then_is_killed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = FakeGateway(101, stops=False), FakeGateway(102, stops=False)
    gateways = gateways_of(first, second)
    gateways.stopping(0)
    later = time.monotonic() + 60.0  # the controller's servers took longer than the whole grace
    monkeypatch.setattr(children.time, "monotonic", lambda: later)
    await gateways.stop()
    for gateway in (first, second):
        assert gateway.signals == ["TERM", "KILL"]
        assert gateway.graces[0] == children.STOP_AFTER_SIGTERM_S



class Clock:
    """`children.time.monotonic`, moved by the waits that run out (a real wait's time passes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.now = now
        monkeypatch.setattr(children.time, "monotonic", lambda: self.now)

    def stuck(self, pid: int) -> FakeGateway:
        clock = self

        class Stuck(FakeGateway):
            def wait(self, timeout: float | None = None) -> int:
                try:
                    return super().wait(timeout)
                except subprocess.TimeoutExpired:
                    clock.now += timeout or 0.0
                    raise

        return Stuck(pid, stops=False)


async def test_gateways_stuck_together_are_killed_at_one_deadline_not_a_moment_each_in_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Their SIGTERMs go together: each wait that runs out takes its time from the next one's."""
    clock = Clock(monkeypatch, time.monotonic())
    stuck = [clock.stuck(100 + i) for i in range(4)]
    gateways = gateways_of(*stuck)
    gateways.stopping(0)
    clock.now += 60.0  # past the deadline: the controller's servers took longer than the whole grace
    began = clock.now
    await gateways.stop()
    assert all(gateway.signals == ["TERM", "KILL"] for gateway in stuck)
    assert stuck[0].graces[0] == children.STOP_AFTER_SIGTERM_S
    assert clock.now - began == pytest.approx(children.STOP_AFTER_SIGTERM_S)  # not 4 of them


async def test_at_the_cap_gateways_stuck_together_are_killed_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch, time.monotonic())
    stuck = [clock.stuck(100 + i) for i in range(8)]
    gateways = gateways_of(*stuck)
    began = clock.now
    gateways.stopping(1_000_000)
    await gateways.stop()
    assert clock.now - began == pytest.approx(children.STOP_GRACE_MAX_S)  # inside the controller's shutdown deadline
