"""Fixtures for use-case tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from controller.scheduling.decider import DecideProcess
from controller.store.db import Database
from uc_builders import add_nodes, add_tenant, apply_topology, every_row


async def build_cluster(db: Database) -> Database:
    """Two racks of two 4-accelerator nodes (8 accelerators per rack) in one row, tenant t1."""
    await apply_topology(db, {"rack-a": "row-a", "rack-b": "row-a"})
    await add_nodes(db, "rack-a", 2)
    await add_nodes(db, "rack-b", 2)
    await add_tenant(db, "t1")
    return db


@pytest.fixture
async def cluster(database: Database) -> Database:
    """`build_cluster` on the test's own database."""
    return await build_cluster(database)


@pytest.fixture(scope="module")
async def _module_cluster(module_database: Database) -> Database:
    return await build_cluster(module_database)


@pytest.fixture
async def shared_cluster(_module_cluster: Database) -> AsyncIterator[Database]:
    """`cluster`, built once per module and backend (on `module_database`) and shared by the
    module's tests that use it: only for tests that write nothing. Each such test still compares
    what it reads after its call with what it read before; besides, every row of every table at
    the end of each test must be what it was at its start (`every_row`), so a test that wrote
    anything fails in its teardown, and no later test starts from its write unseen."""
    before = await every_row(_module_cluster)
    yield _module_cluster
    assert await every_row(_module_cluster) == before, "a test on the shared cluster wrote something"


@pytest.fixture(scope="module")
def decide_process():
    """One decide process (controller/scheduling/decider.py) for a module's reconcilers: each
    cache opens its session there, replacing the last. Closed after the module, no child left."""
    decider = DecideProcess()
    yield decider
    proc = decider._proc
    decider.close()
    assert proc is None or proc.poll() is not None


@pytest.fixture(params=["in_process", "process"])
def decider(request: pytest.FixtureRequest) -> DecideProcess | None:
    """Where a test's reconciler keeps its warm session: in the test's process, or in the decide process."""
    return request.getfixturevalue("decide_process") if request.param == "process" else None
