"""The isolation version (`isolation_state.version`, moved by the database's triggers: migrations
0005, 0012, 0019) moves for every statement that changed what the isolation rules read, and, on
PostgreSQL, for no other: a statement that touched no row, or wrote a watched column's value
over itself, moved it and so owed the isolation watchdog a full check (it takes a version moved
with no change logged for a hand edit)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from controller.store.db import Database

from .seed import TWO_RACKS, seed_problem

pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])

CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": "n1", "rack": "rack1", "accelerators": 4}, {"id": "n2", "rack": "rack2", "accelerators": 4}],
    "tenants": [{"id": "a", "excludes": ["b"]}, {"id": "b"}],
    "deployments": [
        {"id": "a/web", "tenant": "a", "replicas": 2, "shards_per_replica": 1, "shard": {"accelerators": 1}},
        {"id": "b/idle", "tenant": "b", "replicas": 1, "shards_per_replica": 1, "shard": {"accelerators": 1}},
    ],
    "placements": [
        {"deployment": "a/web", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
        {"deployment": "a/web", "replica": 1, "shard": 0, "node": "n2", "accelerator_indices": [0]},
    ],
}

NO_ROW_CHANGED = [
    "DELETE FROM placements WHERE node_id = 'nowhere'",
    "UPDATE placements SET node_id = 'n2' WHERE id = -1",
    "UPDATE placements SET node_id = node_id, accelerator_indices = accelerator_indices, replica = replica",
    "INSERT INTO racks (id, row_id) SELECT 'rack9', 'row1' WHERE false",
    "UPDATE nodes SET rack_id = rack_id, accelerators = accelerators",
    "UPDATE nodes SET accelerators = 8 WHERE id = 'nowhere'",
    "DELETE FROM deployments WHERE name = 'nowhere'",
    "UPDATE deployments SET shard_accelerators = shard_accelerators",
    "UPDATE tenants SET excludes = '[\"b\"]' WHERE id = 'a'",  # the same list
    "UPDATE rows SET zone_id = zone_id",
]
ROWS_CHANGED = [
    "UPDATE placements SET accelerator_indices = '[1]' WHERE replica = 1",
    "UPDATE placements SET node_id = 'n1' WHERE replica = 1",
    "DELETE FROM placements WHERE replica = 1",
    "INSERT INTO racks (id, row_id, created_at) VALUES ('rack9', 'row1', now())",
    "UPDATE nodes SET rack_id = 'rack1' WHERE id = 'n2'",
    "DELETE FROM deployments WHERE name = 'idle'",
    "UPDATE tenants SET excludes = '[]' WHERE id = 'a'",
]


async def _version(db: Database) -> int:
    async with db.engine.connect() as conn:
        return (await conn.execute(text("SELECT version FROM isolation_state WHERE id = 1"))).scalar_one()


async def _run(db: Database, statement: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(statement))


async def test_statements_that_change_no_row_leave_the_isolation_version_and_others_move_it(
        database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    for statement in NO_ROW_CHANGED:
        before = await _version(database)
        await _run(database, statement)
        assert await _version(database) == before, statement
    for statement in ROWS_CHANGED:
        before = await _version(database)
        await _run(database, statement)
        assert await _version(database) > before, statement


async def test_a_transaction_moves_the_isolation_version_once_however_many_rows_it_changes(
        database: Database) -> None:
    """Each move updated the version's one row again, walking the versions of it the transaction
    had written: a 10,000-row UPDATE of a watched column took seconds (row-level triggers, 0019).
    Once per transaction says as much to the watchdog (it reads committed states); a move undone
    by a savepoint rolled back to is made again by the next change."""
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()
    before = await _version(database)
    async with database.engine.begin() as conn:
        await conn.execute(text("UPDATE placements SET accelerator_indices = '[3]'"))  # two rows
        await conn.execute(text("UPDATE nodes SET accelerators = 8"))  # two more, another table
        await conn.execute(text("DELETE FROM placements WHERE replica = 1"))
    assert await _version(database) == before + 1
    async with database.engine.begin() as conn:
        await conn.execute(text("SAVEPOINT s"))
        await conn.execute(text("UPDATE nodes SET accelerators = 4"))
        await conn.execute(text("ROLLBACK TO SAVEPOINT s"))
        assert (await conn.execute(text("SELECT version FROM isolation_state"))).scalar_one() == before + 1
        await conn.execute(text("UPDATE tenants SET excludes = '[]' WHERE id = 'a'"))
    assert await _version(database) == before + 2
