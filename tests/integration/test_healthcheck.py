"""`python -m controller.healthcheck` (the image's HEALTHCHECK) against a live controller."""

from __future__ import annotations

import asyncio
import socket

from controller.api.server import ControllerApp
from controller.healthcheck import check, main


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_serving_controller_passes_and_a_closed_port_fails(controller_app: ControllerApp) -> None:
    # Synchronous gRPC: in a thread, while this loop serves the controller.
    assert await asyncio.to_thread(check, controller_app.address) == "SERVING"
    assert await asyncio.to_thread(main, [controller_app.address]) == 0
    closed = _closed_port()
    assert (await asyncio.to_thread(check, closed, timeout_s=1.0)).startswith("unreachable")
    assert await asyncio.to_thread(main, [closed]) == 1
