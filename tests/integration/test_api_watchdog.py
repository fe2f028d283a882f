"""The running controller runs the isolation watchdog (its rules and alarms: tests/store/test_watchdog.py)."""

from __future__ import annotations

from prometheus_client import generate_latest

from controller.api.server import ControllerApp
from grpc_harness import eventually


async def test_the_controller_checks_its_placements_continuously(controller_app: ControllerApp) -> None:
    async def rounds() -> tuple[int, int]:
        return controller_app.watchdog.checks_total, controller_app.watchdog.skipped_total

    # A full check at start, then rounds that find nothing changed.
    await eventually(rounds, lambda r: r[0] >= 1 and r[1] >= 1, timeout=20, what="watchdog rounds")
    assert controller_app.watchdog.alarms_total == 0 and controller_app.watchdog.active_violations == 0
    controller_app.watchdog.alarms_total = 3  # as if three alarms were raised: the counter exports it
    controller_app.watchdog.active_violations = 2  # and two still stood: the gauge (alerts.yml reads both)
    scraped = generate_latest(controller_app.metrics.registry).decode()
    assert "maia_isolation_watchdog_alarms_total 3.0" in scraped
    assert "maia_isolation_watchdog_violations 2.0" in scraped
