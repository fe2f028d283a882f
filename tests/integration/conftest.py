"""Fixtures for integration tests: a real controller (in-process gRPC server on 127.0.0.1:0)
on each database backend, and stubs on a channel to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from controller.api.server import ControllerApp
from controller.config import Config
from grpc_harness import Stubs


@pytest.fixture
async def controller_app(db_url: str) -> AsyncIterator[ControllerApp]:
    app = ControllerApp(Config(listen="127.0.0.1:0", db_url=db_url, reconcile_interval_s=0.2,
                               heartbeat_timeout_s=2.0, solve_time_limit_ms=1000))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=1.0)


@pytest.fixture
async def stubs(controller_app: ControllerApp) -> AsyncIterator[Stubs]:
    channel = grpc.aio.insecure_channel(controller_app.address)
    try:
        yield Stubs.on(channel)
    finally:
        await channel.close()
