"""The running controller runs the isolation watchdog (its rules and alarms: tests/store/test_watchdog.py)."""

from __future__ import annotations

from controller.api.server import ControllerApp
from grpc_harness import eventually


async def test_the_controller_checks_its_placements_continuously(controller_app: ControllerApp) -> None:
    async def checks() -> int:
        return controller_app.watchdog.checks_total

    await eventually(checks, lambda n: n >= 2, timeout=20, what="two watchdog checks")
    assert controller_app.watchdog.alarms_total == 0 and controller_app.watchdog.active_violations == 0
