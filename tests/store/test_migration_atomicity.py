"""An upgrade is all or nothing, and Maia's schema goes only into an empty database or its own.

SQLite's driver began a transaction only before an INSERT, UPDATE or DELETE, so each CREATE or
ALTER before the first version stamp was committed on its own: an upgrade that failed (or was
killed) part way left tables of later revisions under an older stamp, and every later upgrade
failed on them ("table audit_log already exists"). PostgreSQL's DDL was always transactional.
Here a migration late in the chain fails on a table that is in its way (after the SQLite table
rebuilds of 0010 and 0024), as a kill there would stop it, and the database must be left at the
revision it had, whole, and upgrade once the obstacle is gone.
"""

from __future__ import annotations

import logging

import pytest
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from controller.store import migrate as schema_migrate
from controller.store.db import Database
from controller.store.migrate import SchemaBehindError, ensure_schema, head_revision

from .test_migration_0010 import _add_deployment, _add_tenant, _downgrade, _run, _upgrade
from .test_migrations import _diff

START = "0001_initial"
# What migration 0027 creates, made beforehand: the upgrade fails there, 26 migrations in.
IN_THE_WAY = "CREATE TABLE known_tenants (id VARCHAR(128) PRIMARY KEY, note VARCHAR(10))"


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _schema(connection: Connection) -> dict[str, tuple]:
    """Every table with its columns, indexes, unique and foreign keys (the parts migrations change)."""
    inspector = inspect(connection)
    return {table: (tuple(c["name"] for c in inspector.get_columns(table)),
                    sorted(i["name"] or "" for i in inspector.get_indexes(table)),
                    sorted(u["name"] or "" for u in inspector.get_unique_constraints(table)),
                    sorted((f["referred_table"], tuple(f["constrained_columns"])) for f in inspector.get_foreign_keys(table)))
            for table in inspector.get_table_names()}


async def _at_start_with_data_and_an_obstacle(db_url: str, db: Database) -> dict[str, tuple]:
    """The database at 0001 with a tenant and a deployment, the table in 0027's way; its schema."""
    await _upgrade(db_url, START)
    await _add_tenant(db, "lab-a")
    await _add_deployment(db, "lab-a", "chat")
    await _run(db, IN_THE_WAY)
    async with db.engine.connect() as conn:
        return await conn.run_sync(_schema)


async def _left_as_it_was(db: Database, schema: dict[str, tuple]) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_current_revision) == START
        assert await conn.run_sync(_schema) == schema  # no table of 0002..0026 (audit_log, ...), none rebuilt
    assert await _run(db, "SELECT tenant_id, name FROM deployments") == [("lab-a", "chat")]


async def _upgrades_once_out_of_the_way(db: Database) -> None:
    await _run(db, "DROP TABLE known_tenants")
    assert await ensure_schema(db, migrate=True) == head_revision()
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
    assert await _run(db, "SELECT tenant_id, name FROM deployments") == [("lab-a", "chat")]
    assert await _run(db, "SELECT id FROM known_tenants") == [("lab-a",)]


async def test_a_failed_alembic_upgrade_leaves_the_database_at_its_revision(db_url: str) -> None:
    db = Database(db_url)
    try:
        schema = await _at_start_with_data_and_an_obstacle(db_url, db)
        with pytest.raises(Exception, match="known_tenants"):
            await _upgrade(db_url, "head")
        await _left_as_it_was(db, schema)
        with pytest.raises(Exception, match="known_tenants"):  # the same failure, not one of a half-done upgrade
            await _upgrade(db_url, "head")
        await _upgrades_once_out_of_the_way(db)
    finally:
        await db.dispose()


async def test_a_failed_migration_on_start_leaves_the_database_at_its_revision(db_url: str) -> None:
    db = Database(db_url)
    try:
        schema = await _at_start_with_data_and_an_obstacle(db_url, db)
        for _ in range(2):  # a second start fails the same way
            with pytest.raises(schema_migrate.MigrationFailedError) as caught:
                await ensure_schema(db, migrate=True)
            message = str(caught.value)
            assert "known_tenants" in message and START in message and head_revision() in message, message
            assert "nothing of the upgrade was kept" in message and "; hint: " in message, message
            assert "reachable" not in message, message
            assert len(message.splitlines()) == 1, message
            await _left_as_it_was(db, schema)
        if db.is_sqlite:  # migrations ran with foreign keys off; the pooled connection has them on again
            async with db.engine.connect() as conn:
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() == 1
        await _upgrades_once_out_of_the_way(db)
    finally:
        await db.dispose()


async def test_a_failed_downgrade_leaves_the_database_at_its_revision(db_url: str) -> None:
    db = Database(db_url)
    try:
        await _upgrade(db_url, "head")
        for tenant in ("lab-a", "lab-b"):
            await _add_tenant(db, tenant)
            await _add_deployment(db, tenant, "chat")
        async with db.engine.connect() as conn:
            schema = await conn.run_sync(_schema)
        # 0010's downgrade refuses two tenants' `chat`, once 0028..0011 were undone.
        with pytest.raises(Exception, match="several tenants"):
            await _downgrade(db_url, START)
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_current_revision) == head_revision()
            assert await conn.run_sync(_schema) == schema
        assert await _run(db, "SELECT id FROM known_tenants ORDER BY id") == [("lab-a",), ("lab-b",)]
    finally:
        await db.dispose()


@pytest.mark.parametrize("migrate", [True, False])
async def test_another_applications_database_is_refused_and_left_alone(db_url: str, migrate: bool) -> None:
    db = Database(db_url)
    try:
        for table in ("customers", "orders", "invoices", "payments"):
            await _run(db, f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name VARCHAR(20))")
        await _run(db, "INSERT INTO customers VALUES (1, 'x')")
        with pytest.raises(schema_migrate.ForeignDatabaseError) as caught:
            await ensure_schema(db, migrate=migrate)
        message = str(caught.value)
        assert "not Maia's" in message and "no Maia schema version" in message, message
        assert "customers, invoices, orders and 1 more" in message, message
        assert "; hint: " in message and "--migrate" not in message, message
        async with db.engine.connect() as conn:
            assert set(await conn.run_sync(lambda sync: inspect(sync).get_table_names())) == {
                "customers", "orders", "invoices", "payments"}
        assert await _run(db, "SELECT * FROM customers") == [(1, "x")]
    finally:
        await db.dispose()


async def test_a_database_left_with_only_an_empty_version_table_counts_as_empty(db_url: str) -> None:
    """`alembic downgrade base` leaves `alembic_version` and nothing else: Maia's own, upgraded again."""
    await _upgrade(db_url, START)
    await _downgrade(db_url, "base")
    db = Database(db_url)
    try:
        with pytest.raises(SchemaBehindError):
            await ensure_schema(db, migrate=False)
        assert await ensure_schema(db, migrate=True) == head_revision()
    finally:
        await db.dispose()



@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_extensions_views_do_not_make_a_database_anothers(db_url: str) -> None:
    """A PostgreSQL database prepared with `CREATE EXTENSION pg_stat_statements` (its views sit in
    the public schema) is still empty to Maia: migrated, not refused (`bench e2e --db postgres`
    prepares its database so)."""
    db = Database(db_url)
    try:
        await _run(db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        assert await ensure_schema(db, migrate=True) == head_revision()
    finally:
        await db.dispose()


async def test_a_migration_on_start_says_from_which_schema(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A controller's own migration logged only "schema ready": nothing said a migration had run,
    nor from where (found by exploratory testing)."""
    db = Database(db_url)
    try:
        await _upgrade(db_url, START)
        with caplog.at_level(logging.INFO, logger="maia.migrate"):
            assert await ensure_schema(db, migrate=True) == head_revision()
            assert await ensure_schema(db, migrate=True) == head_revision()  # at head: nothing to say
        assert [r.getMessage() for r in caplog.records if r.name == "maia.migrate"] == [
            f"migrated the database from schema {START} to {head_revision()}"]
    finally:
        await db.dispose()
