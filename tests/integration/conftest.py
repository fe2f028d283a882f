"""Fixtures for integration tests: a real controller (in-process gRPC server on 127.0.0.1:0)
on each database backend with authentication on, and stubs on a channel to it that carry the
bootstrap admin token.

`controller_app` starts on an already migrated database (a copy of the session's template, see
tests/conftest.py): what these tests are about is the API, and a migration at every start cost
0.3-0.6 s a test. Starting on an empty database (migrating it) is tested by the tests that start
their controllers on `db_url` themselves (test_api_auth.py, test_controller_startup.py, tests/cli).

Tests whose every call is refused (nothing written) may share one controller per module and
backend instead (`shared_controller`, `shared_seeded`): a controller's start and `seeded`'s
setup cost 1-2 s a test on PostgreSQL, far more than such a test's calls. A test that writes, or
whose outcome depends on what the controller saw before (rate limits, the audit log, caches),
keeps a controller of its own.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.api.server import ControllerApp
from controller.store.db import Database
from grpc_harness import Stubs, admin_token_of, eventually, running_controller, spec, topology, written_state
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


async def seed(stubs: Stubs) -> None:
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


@pytest.fixture
async def seeded(stubs: Stubs) -> Stubs:
    """`seed`'s state on the test's own controller."""
    await seed(stubs)
    return stubs


@pytest.fixture(scope="module")
async def shared_controller(module_database: Database,
                            tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControllerApp]:
    """`controller_app`, but one per module and backend, shared by the module's tests that use it:
    only for tests that write nothing, and whose outcome does not depend on the calls before them."""
    async with running_controller(module_database.url, tmp_path_factory.mktemp("shared-controller")) as app:
        yield app


@pytest.fixture(scope="module")
async def _shared_seeded_stubs(shared_controller: ControllerApp) -> AsyncIterator[Stubs]:
    stubs = Stubs.connect(shared_controller.address, admin_token_of(shared_controller))
    try:
        await seed(stubs)
        yield stubs
    finally:
        await stubs.channel.close()


@pytest.fixture
async def shared_seeded(shared_controller: ControllerApp, _shared_seeded_stubs: Stubs) -> AsyncIterator[Stubs]:
    """`seeded`'s state, on the module's `shared_controller`: for tests whose calls are all refused.

    Each such test still compares what it reads after its call with what it read just before it.
    Here, besides, the state at the end of every test (`written_state`: deployments, tenants,
    topology, nodes and their cordon and drain marks, tokens) must be what it was at its start: a
    test that wrote any of it fails (in its teardown) even where it checks no state itself, and so
    does not leave its write for a later test to start from unseen. Not compared: the audit log
    and the event log (a refusal is recorded), a node's liveness, the reconciler's judgement.
    """
    before = await written_state(shared_controller, _shared_seeded_stubs)
    yield _shared_seeded_stubs
    assert await written_state(shared_controller, _shared_seeded_stubs) == before, \
        "a test on the shared controller wrote something"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 another program listens on, for the test's length."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]
