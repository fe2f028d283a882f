"""A controller that has bound its port but not yet checked its schema and read its tokens answers
every call at once, UNAVAILABLE "starting" with a retry time (clients retry it), instead of
accepting connections and answering nothing until it is ready."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.api.server import ControllerApp
from controller.retryinfo import told_retry_s
from controller.simnode.transport import starting as says_starting
from controller.store import migrate
from controller.store.db import Database
from grpc_harness import TEST_CONFIG, Stubs
from maia.v1 import agent_pb2, deployments_pb2
from tests.addresses import closed_port_address


async def _refusal(call: grpc.aio.Call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


async def test_a_starting_controller_answers_every_call_starting_with_a_retry_time(
        database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checking, checked = asyncio.Event(), asyncio.Event()
    real_ensure_schema = migrate.ensure_schema

    async def slow_schema_check(db: Database, *, migrate: bool) -> str:
        checking.set()
        await checked.wait()
        return await real_ensure_schema(db, migrate=migrate)

    monkeypatch.setattr(migrate, "ensure_schema", slow_schema_check)
    address = closed_port_address()
    app = ControllerApp(replace(TEST_CONFIG, db_url=database.url, listen=address,
                                bootstrap_admin_token_file=str(tmp_path / "admin.token")))
    starting = asyncio.create_task(app.start())
    try:
        await asyncio.wait_for(checking.wait(), timeout=30)
        stubs = Stubs.connect(address, "no-token-read-yet")
        health = health_pb2_grpc.HealthStub(stubs.channel)
        try:
            connect = stubs.agent.Connect()  # streams both ways: refused before its first message is read
            refusals = [
                await _refusal(stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="web"),
                                                               timeout=10)),
                await _refusal(stubs.deployments.WatchDeployments(deployments_pb2.WatchDeploymentsRequest(),
                                                                  timeout=10).read()),
                await _refusal(connect.read()),
                await _refusal(health.Check(health_pb2.HealthCheckRequest(), timeout=10)),
            ]
            assert not starting.done()
            for refused in refusals:
                assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
                assert refused.details().startswith("the controller is starting"), refused.details()
                assert told_retry_s(refused.trailing_metadata()) == 0.5
                assert says_starting(refused)  # what an agent with other controllers moves on at
            checked.set()
            await asyncio.wait_for(starting, timeout=60)
            served = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert served.status == health_pb2.HealthCheckResponse.SERVING
            registered = await _refusal(stubs.agent.Register(agent_pb2.RegisterRequest(), timeout=10))
            assert registered.code() == grpc.StatusCode.UNAUTHENTICATED  # served now: its token is read
        finally:
            await stubs.channel.close()
    finally:
        checked.set()
        if not starting.done():
            await asyncio.wait_for(starting, timeout=60)
        await app.stop(grace_s=1.0)
