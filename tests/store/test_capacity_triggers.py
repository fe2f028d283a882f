"""The capacity generation (`capacity_state.generation`, moved by the database's triggers:
migrations 0012, 0022) moves for every statement that changed what the cluster could ever hold,
and for no other: a statement that touched no row, or wrote a watched column's value over
itself, moved it, and the submit path then rebuilt its aggregates of every node
(`usecases.capacity.CapacityCache`). On PostgreSQL a transaction moves it once, however many rows
it changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text

from controller.store.db import Database
from controller.store.migrate import alembic_config

from .seed import TWO_RACKS, seed_problem

CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": "n1", "rack": "rack1", "accelerators": 4},
              {"id": "n2", "rack": "rack2", "accelerators": 4, "hbm_gib": 80}],
    "deployments": [],
}

NO_ROW_CHANGED = [
    "DELETE FROM nodes WHERE id = 'nowhere'",
    "UPDATE nodes SET accelerators = 8 WHERE id = 'nowhere'",
    "UPDATE nodes SET rack_id = rack_id, accelerators = accelerators, accelerator_model = accelerator_model, "
    "hbm_gib = hbm_gib",  # n1's HBM is NULL, n2's is not
    "UPDATE nodes SET accelerators = 4 WHERE id = 'n1'",  # the value it had
    "UPDATE nodes SET cpu_milli = 5000, idle_power_w = 100",  # no watched column
    "INSERT INTO racks (id, row_id, created_at) SELECT 'rack9', 'row1', CURRENT_TIMESTAMP WHERE 1 = 0",
    "UPDATE racks SET row_id = row_id",
    "DELETE FROM racks WHERE id = 'nowhere'",
    "UPDATE rows SET zone_id = zone_id",
    "DELETE FROM rows WHERE id = 'nowhere'",
]
ROWS_CHANGED = [
    "INSERT INTO racks (id, row_id, created_at) VALUES ('rack9', 'row1', CURRENT_TIMESTAMP)",
    "UPDATE nodes SET rack_id = 'rack9' WHERE id = 'n2'",
    "UPDATE nodes SET hbm_gib = 96 WHERE id = 'n1'",  # from NULL
    "UPDATE nodes SET hbm_gib = NULL WHERE id = 'n2'",  # to NULL
    "UPDATE nodes SET accelerator_model = 'tpu-v5' WHERE id = 'n1'",
    "UPDATE nodes SET accelerators = 8",
    "INSERT INTO rows (id, zone_id, created_at) VALUES ('row9', 'z1', CURRENT_TIMESTAMP)",
    "UPDATE racks SET row_id = 'row9' WHERE id = 'rack9'",
    "UPDATE nodes SET rack_id = 'rack1' WHERE id = 'n2'",
    "DELETE FROM racks WHERE id = 'rack9'",
    "DELETE FROM nodes WHERE id = 'n2'",
]


async def _generation(db: Database) -> int:
    async with db.engine.connect() as conn:
        return (await conn.execute(text("SELECT generation FROM capacity_state WHERE id = 1"))).scalar_one()


async def _run(db: Database, *statements: str) -> None:
    async with db.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def _seeded(db: Database) -> None:
    async with db.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()


async def _moved_by(db: Database, statements: list[str]) -> dict[str, int]:
    """How far each statement, a transaction of its own, moved the generation."""
    moved = {}
    for statement in statements:
        before = await _generation(db)
        await _run(db, statement)
        moved[statement] = await _generation(db) - before
    return moved


async def test_statements_that_change_no_row_leave_the_capacity_generation_and_others_move_it(
        database: Database) -> None:
    await _seeded(database)
    assert await _moved_by(database, NO_ROW_CHANGED) == dict.fromkeys(NO_ROW_CHANGED, 0)
    moved = await _moved_by(database, ROWS_CHANGED)
    assert [statement for statement, by in moved.items() if by < 1] == []
    if database.engine.dialect.name == "postgresql":  # once per transaction (SQLite: once per row)
        assert set(moved.values()) == {1}


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_transaction_moves_the_capacity_generation_once_however_many_rows_it_changes(
        database: Database) -> None:
    """Each move updated the generation's one row again, walking the versions of it the transaction
    had written (migration 0020 measured seconds for a 10,000-row UPDATE of the isolation version's
    tables). Once per transaction says as much to the cache (it reads committed states); a move
    undone by a savepoint rolled back to is made again by the next change."""
    await _seeded(database)
    before = await _generation(database)
    await _run(database, "UPDATE nodes SET accelerators = 8",  # two rows
               "INSERT INTO racks (id, row_id, created_at) VALUES ('rack9', 'row1', CURRENT_TIMESTAMP)",
               "UPDATE nodes SET rack_id = 'rack9'",  # another table
               "DELETE FROM racks WHERE id = 'rack1'")
    assert await _generation(database) == before + 1
    async with database.engine.begin() as conn:
        await conn.execute(text("SAVEPOINT s"))
        await conn.execute(text("UPDATE nodes SET accelerators = 4"))
        await conn.execute(text("ROLLBACK TO SAVEPOINT s"))
        assert (await conn.execute(text("SELECT generation FROM capacity_state"))).scalar_one() == before + 1
        await conn.execute(text("UPDATE rows SET zone_id = zone_id"))  # changes nothing
        assert (await conn.execute(text("SELECT generation FROM capacity_state"))).scalar_one() == before + 1
        await conn.execute(text("UPDATE nodes SET hbm_gib = 16 WHERE id = 'n1'"))
    assert await _generation(database) == before + 2


async def test_the_capacity_triggers_go_back_to_0012s_and_up_again(db_url: str) -> None:
    """Downgraded below 0022 the triggers are 0012's again (a no-op UPDATE moves the generation,
    and on PostgreSQL each statement of a transaction does); upgraded again they are 0022's."""
    postgres = db_url.startswith("postgresql")
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
    await asyncio.to_thread(command.downgrade, alembic_config(db_url), "0021_events_isolation_index")
    db = Database(db_url)
    try:
        await _seeded(db)
        before = await _generation(db)
        await _run(db, "UPDATE nodes SET accelerators = accelerators",  # SQLite: a run per row, two rows
                   "DELETE FROM nodes WHERE id = 'nowhere'")  # PostgreSQL: a run per statement
        assert await _generation(db) == before + 2
        if postgres:  # 0012's function body (but for its white space), and no function of 0022's
            async with db.engine.connect() as conn:
                body = (await conn.execute(text("SELECT prosrc FROM pg_proc WHERE proname = :name"),
                                           {"name": "maia_bump_capacity_generation"})).scalar_one()
                names = set((await conn.execute(text("SELECT proname FROM pg_proc WHERE proname LIKE "
                                                     "'maia%capacity%'"))).scalars())
            assert " ".join(body.split()) == "BEGIN UPDATE capacity_state SET generation = generation + 1 WHERE id = 1; " \
                                   "RETURN NULL; END"
            assert names == {"maia_bump_capacity_generation"}
    finally:
        await db.dispose()
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
    db = Database(db_url)
    try:
        before = await _generation(db)
        await _run(db, "UPDATE nodes SET accelerators = accelerators", "DELETE FROM nodes WHERE id = 'nowhere'")
        assert await _generation(db) == before
        await _run(db, "UPDATE nodes SET accelerators = 2", "DELETE FROM nodes WHERE id = 'n1'")
        assert await _generation(db) == before + (1 if postgres else 3)
    finally:
        await db.dispose()
