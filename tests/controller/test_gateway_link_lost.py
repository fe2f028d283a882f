"""A gateway whose link was lost (`GatewayProcesses.link_lost`): one that exits on its own, as a
gateway that lost its link does, is left to its watcher; one still there at the end of its grace
is hung and is killed; none is killed once the controller's stop began (the stop deals with them)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from controller.gateway import children
from controller.gateway.children import GatewayProcesses, GatewaySettings


def gateways_running(script: str) -> tuple[GatewayProcesses, subprocess.Popen[str]]:
    """Gateways whose one process runs `script` (a stand-in for a gateway)."""
    gateways = GatewayProcesses(GatewaySettings(count=1, listen="127.0.0.1:0", linger_ms=5.0))
    process = subprocess.Popen([sys.executable, "-c", script], text=True)
    gateways.processes = [process]
    return gateways, process


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(children, "STOP_GRACE_S", 0.3)


@pytest.mark.parametrize("stuck", [False, True], ids=["hung", "lost to its pings"])
async def test_a_gateway_still_there_after_its_grace_is_killed(stuck: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost to its pings (`stuck`), its event loop is: it cannot end its agents' calls in the stop's
    grace (which grows to 20 s with its streams), so it is killed after STUCK_GRACE_S whatever its
    streams."""
    if stuck:
        monkeypatch.setattr(children, "STOP_GRACE_S", 60.0)
        monkeypatch.setattr(children, "STUCK_GRACE_S", 0.3)
    gateways, hung = gateways_running("import time; time.sleep(60)")
    try:
        gateways.link_lost(hung.pid, 16_384 if stuck else 0, stuck)
        await asyncio.sleep(0.1)
        assert hung.poll() is None  # within its grace
        await asyncio.wait_for(asyncio.to_thread(hung.wait), 10)
        assert hung.returncode == -signal.SIGKILL
    finally:
        hung.kill()
        hung.wait()
        gateways.link_directory.remove()


async def test_a_gateway_that_exits_within_its_grace_is_not_killed() -> None:
    gateways, exiting = gateways_running("import sys, time; time.sleep(0.1); sys.exit(4)")
    try:
        gateways.link_lost(exiting.pid, calls=0)
        await asyncio.sleep(0.6)
        assert exiting.poll() == 4
    finally:
        exiting.kill()
        exiting.wait()
        gateways.link_directory.remove()


@pytest.mark.parametrize("case", ["stopping", "another pid", "no pid"])
async def test_no_gateway_is_killed_while_stopping_nor_for_a_link_not_its_own(case: str) -> None:
    gateways, process = gateways_running("import time; time.sleep(60)")
    try:
        if case == "stopping":
            gateways.stopping()
        gateways.link_lost({"stopping": process.pid, "another pid": process.pid + 100_000, "no pid": None}[case], 0)
        await asyncio.sleep(0.6)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()
        gateways.link_directory.remove()
