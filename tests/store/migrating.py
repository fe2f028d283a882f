"""A migration run by hand (`alembic upgrade head`) while an older controller still writes."""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import text

from controller.store.db import Database, UnitOfWork
from controller.store.migrate import alembic_config


async def _lock_waited_for(database: Database) -> bool:
    async with database.unit_of_work() as uow:
        return bool(await uow.session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


async def upgrade_past(writer: UnitOfWork, db_url: str, database: Database, table: str) -> None:
    """PostgreSQL: upgrade to head in a thread while `writer`'s transaction holds a lock the
    migration needs (rows of `table` it wrote), commit `writer` once the migration waits for it,
    and return when the migration is done: a write in flight as the migration starts."""
    migrating = asyncio.create_task(asyncio.to_thread(command.upgrade, alembic_config(db_url), "head"))
    for _ in range(600):  # until the migration waits for the writer (at most ~30 s)
        if await _lock_waited_for(database):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the migration never waited for the writer's lock on {table}")
    await writer.commit()
    await asyncio.wait_for(migrating, 60)


async def holding_the_migration_lock(db_url: str, database: Database) -> None:
    """PostgreSQL: `alembic upgrade head` from the command line, in a thread, while another
    session holds the controllers' migration lock: it waits for the lock (and migrates nothing
    meanwhile), then migrates once the lock is let go."""
    from controller.store.migrate import PG_MIGRATION_LOCK_KEY

    async with database.unit_of_work() as holder:  # a starting controller migrating
        await holder.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
        migrating = asyncio.create_task(asyncio.to_thread(command.upgrade, alembic_config(db_url), "head"))
        for _ in range(600):
            if await _lock_waited_for(database):
                break
            await asyncio.sleep(0.05)
        else:
            migrating.cancel()
            pytest.fail("the command line's upgrade never waited for the migration lock")
        assert not migrating.done()
        await holder.commit()
    await asyncio.wait_for(migrating, 60)
