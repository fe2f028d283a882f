"""The capacity generation (`capacity_state.generation`, moved by the database's triggers:
migrations 0012, 0022, 0023, 0036) moves for every statement that changed what the cluster could ever hold,
and for no other: a statement that touched no row, or wrote a watched column's value over
itself, moved it, and the submit path then rebuilt its aggregates of every node
(`usecases.capacity.CapacityCache`). On PostgreSQL a transaction moves it once, however many rows
it changes; its first move in a transaction takes isolation_state's row lock before capacity_state's
(0023), so two transactions cannot each hold one and wait for the other."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from controller.store.db import Database
from controller.store.migrate import alembic_config

from .seed import TWO_RACKS, seed_problem
from .test_commit_plan import _waiting_for_locks

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
    "UPDATE nodes SET cpu_milli = 5000, memory_mib = 1024",  # no watched column
    "UPDATE nodes SET idle_power_w = idle_power_w",
    "UPDATE racks SET power_budget_w = power_budget_w",
    "UPDATE rows SET power_budget_w = power_budget_w",
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
    "UPDATE nodes SET idle_power_w = 321 WHERE id = 'n1'",  # what a shard could ever draw (0036)
    "UPDATE racks SET power_budget_w = 9000 WHERE id = 'rack1'",
    "UPDATE racks SET power_budget_w = NULL WHERE id = 'rack1'",
    "UPDATE rows SET power_budget_w = 50000 WHERE id = 'row1'",
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


async def _seeded(db: Database, cluster: dict[str, Any] = CLUSTER) -> None:
    async with db.unit_of_work() as uow:
        await seed_problem(uow.session, cluster)
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


# Three nodes: n1 and n2 for a transaction that moves the capacity generation first, n3 for one that
# moves the isolation version first (the order 0012 documents), neither waiting for the other's node rows.
THREE_NODES: dict[str, Any] = {**CLUSTER, "nodes": [*CLUSTER["nodes"], {"id": "n3", "rack": "rack2", "accelerators": 4}]}
# n1's accelerator model changed (capacity's trigger only), then n2's CPU (isolation's only): in one
# UPDATE (row-level triggers fire row by row, in the order the statement wrote the rows: n1's first,
# its heap's and its key's order) or in two (as a Register batch writes its nodes, a statement each).
CAPACITY_THEN_ISOLATION = {
    "one statement": ["UPDATE nodes SET accelerator_model = CASE id WHEN 'n1' THEN 'tpu-v5' ELSE accelerator_model END, "
                      "cpu_milli = CASE id WHEN 'n2' THEN 9000 ELSE cpu_milli END WHERE id IN ('n1', 'n2')"],
    "two statements": ["UPDATE nodes SET accelerator_model = 'tpu-v5' WHERE id = 'n1'",
                       "UPDATE nodes SET cpu_milli = 9000 WHERE id = 'n2'"],
}


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("writes", list(CAPACITY_THEN_ISOLATION))
async def test_a_transaction_that_moves_the_capacity_generation_first_takes_the_isolation_versions_lock_first(
        database: Database, writes: str) -> None:
    """One transaction changed n3's CPU (isolation_state's row locked) and waits; the other changes
    n1's accelerator model, then n2's CPU, and waits for isolation_state's row; the first then
    changes n3's accelerator model. The second had locked capacity_state's row at n1 (0022's
    triggers): each waited for the other, and PostgreSQL aborted one as a deadlock (an error the
    controller does not retry: `db.database_failed` is false for it). Both commit."""
    await _seeded(database, THREE_NODES)
    async with database.engine.connect() as conn:
        assert list((await conn.execute(text("SELECT id FROM nodes ORDER BY ctid"))).scalars()) == ["n1", "n2", "n3"]
    isolation_held, go_on = asyncio.Event(), asyncio.Event()

    async def isolation_then_capacity() -> None:
        async with database.engine.begin() as conn:
            await conn.execute(text("UPDATE nodes SET cpu_milli = 7000 WHERE id = 'n3'"))
            isolation_held.set()
            await go_on.wait()
            await conn.execute(text("UPDATE nodes SET accelerator_model = 'tpu-v6' WHERE id = 'n3'"))

    documented = asyncio.create_task(isolation_then_capacity())
    await isolation_held.wait()
    capacity_first = asyncio.create_task(_run(database, *CAPACITY_THEN_ISOLATION[writes]))
    await _waiting_for_locks(database, 1)
    go_on.set()
    outcomes = await asyncio.wait_for(asyncio.gather(documented, capacity_first, return_exceptions=True), 60)
    assert [str(o).splitlines()[0] for o in outcomes if isinstance(o, BaseException)] == []
    async with database.engine.connect() as conn:
        nodes = (await conn.execute(text("SELECT id, accelerator_model, cpu_milli FROM nodes ORDER BY id"))).all()
    assert [tuple(row) for row in nodes] == [("n1", "tpu-v5", None), ("n2", "", 9000), ("n3", "tpu-v6", 7000)]


async def _isolation_held_by_a_capacity_move(db: Database) -> bool:
    """Whether a transaction that moved the capacity generation alone (n1's accelerator model, which
    the isolation rules do not read) holds isolation_state's row: another's NOWAIT lock is refused."""
    async with db.engine.connect() as mover, db.engine.connect() as other:
        transaction = await mover.begin()
        await mover.execute(text("UPDATE nodes SET accelerator_model = accelerator_model || '+' WHERE id = 'n1'"))
        try:
            async with other.begin():
                await other.execute(text("SELECT id FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE NOWAIT"))
            return False
        except DBAPIError as exc:
            assert "could not obtain lock" in str(exc)  # 55P03, lock_not_available
            return True
        finally:
            await transaction.rollback()


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_the_capacity_move_takes_the_isolation_versions_lock_from_0023_on(db_url: str) -> None:
    """Downgraded to 0022 the capacity generation's move locks capacity_state's row alone; upgraded
    again it locks isolation_state's first, and still moves the generation once."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
    await asyncio.to_thread(command.downgrade, alembic_config(db_url), "0022_capacity_triggers_rows")
    db = Database(db_url)
    try:
        await _seeded(db)
        assert not await _isolation_held_by_a_capacity_move(db)
    finally:
        await db.dispose()
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
    db = Database(db_url)
    try:
        assert await _isolation_held_by_a_capacity_move(db)
        before = await _generation(db)
        await _run(db, "UPDATE nodes SET cpu_milli = 100", "UPDATE nodes SET accelerator_model = 'x'",
                   "UPDATE nodes SET accelerators = 2")
        assert await _generation(db) == before + 1
    finally:
        await db.dispose()
