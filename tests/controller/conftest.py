"""Fixtures for use-case tests."""

from __future__ import annotations

import pytest

from controller.scheduling.decider import DecideProcess
from controller.store.db import Database
from uc_builders import add_nodes, add_tenant, apply_topology


@pytest.fixture
async def cluster(database: Database) -> Database:
    """Two racks of two 4-accelerator nodes (8 accelerators per rack) in one row, tenant t1."""
    await apply_topology(database, {"rack-a": "row-a", "rack-b": "row-a"})
    await add_nodes(database, "rack-a", 2)
    await add_nodes(database, "rack-b", 2)
    await add_tenant(database, "t1")
    return database


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
