"""Fixtures for integration tests: a real controller (in-process gRPC server on 127.0.0.1:0)
on each database backend with authentication on, and stubs on a channel to it that carry the
bootstrap admin token.

`controller_app` starts on an already migrated database (a copy of the session's template, see
tests/conftest.py): what these tests are about is the API, and a migration at every start cost
0.3-0.6 s a test. Starting on an empty database (migrating it) is tested by the tests that start
their controllers on `db_url` themselves (test_api_auth.py, test_controller_startup.py, tests/cli).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.api.server import ControllerApp
from controller.store.db import Database
from grpc_harness import Stubs, admin_token_of, eventually, running_controller, spec, topology
from maia.v1 import admin_pb2, agent_pb2, deployments_pb2


@pytest.fixture
async def controller_app(database: Database, tmp_path: Path) -> AsyncIterator[ControllerApp]:
    async with running_controller(database.url, tmp_path) as app:
        yield app


@pytest.fixture
def admin_token(controller_app: ControllerApp) -> str:
    return admin_token_of(controller_app)


@pytest.fixture
async def stubs(controller_app: ControllerApp, admin_token: str) -> AsyncIterator[Stubs]:
    stubs = Stubs.connect(controller_app.address, admin_token)
    try:
        yield stubs
    finally:
        await stubs.channel.close()


@pytest.fixture
async def seeded(stubs: Stubs) -> Stubs:
    """Rack rack-a, tenant lab, node n1 (registered, never connected) and deployment `existing`,
    judged by the reconciler (it stays pending with reasons)."""
    await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    reply = await stubs.agent.Register(agent_pb2.RegisterRequest(node=agent_pb2.NodeInfo(
        node_id="n1", rack="rack-a", accelerators=4, accelerator_model="maia-100")))
    assert reply.session_id
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec("existing")))
    await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="existing")),
                     lambda d: len(d.reasons) > 0, what="existing judged by the reconciler")
    return stubs
