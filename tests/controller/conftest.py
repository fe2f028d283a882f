"""Fixtures for use-case tests."""

from __future__ import annotations

import pytest

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
