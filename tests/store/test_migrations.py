"""The migrations and the models describe the same schema, on both backends.

A model change without a migration (or a hand-edited migration that drifted) fails here, the
way `alembic check` would in CI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.leadership import LeaderElection, NotLeader
from controller.store import lease
from controller.store.db import Database
from controller.store.migrate import (
    SchemaAheadError,
    SchemaBehindError,
    alembic_config,
    code_revisions,
    ensure_schema,
    head_revision,
)
from controller.store.models import Base, ClusterState


def _diff(connection: Connection) -> list:
    ctx = MigrationContext.configure(
        connection, opts={"compare_type": True, "render_as_batch": connection.dialect.name == "sqlite"}
    )
    return compare_metadata(ctx, Base.metadata)


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_head_is_the_initial_revision_or_later() -> None:
    assert head_revision() >= "0001_initial"


async def test_upgrade_matches_models_and_downgrade_empties(db_url: str) -> None:
    cfg = alembic_config(db_url)
    # The command-line path: env.py builds its own async engine (in a thread: it runs asyncio.run).
    await asyncio.to_thread(command.upgrade, cfg, "head")

    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            assert await conn.run_sync(_table_names) >= set(Base.metadata.tables)
        async with db.unit_of_work() as uow:
            state = (await uow.session.execute(select(ClusterState))).scalar_one()
            assert (state.id, state.generation) == (1, 0)

        await asyncio.to_thread(command.downgrade, alembic_config(db_url), "base")
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_table_names) == {"alembic_version"}
    finally:
        await db.dispose()


async def test_ensure_schema_refuses_a_database_behind_head(db_url: str) -> None:
    db = Database(db_url)
    try:
        with pytest.raises(SchemaBehindError) as caught:
            await ensure_schema(db, migrate=False)
        message = str(caught.value)
        assert head_revision() in message
        assert "maia-controller --migrate" in message and "alembic upgrade head" in message
        assert caught.value.current is None

        assert await ensure_schema(db, migrate=True) == head_revision()
        # Idempotent, and the check alone now passes.
        assert await ensure_schema(db, migrate=True) == head_revision()
        assert await ensure_schema(db, migrate=False) == head_revision()
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await db.dispose()


async def test_the_revision_files_are_read_once_per_process(database: Database,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading them runs every revision file; each controller start checks the schema (the test
    # suite starts hundreds of controllers in one process) and GetVersion names the head.
    reads: list[str] = []
    from_config = ScriptDirectory.from_config

    def counted(config: Config) -> ScriptDirectory:
        reads.append(config.get_main_option("script_location") or "")
        return from_config(config)

    monkeypatch.setattr(ScriptDirectory, "from_config", counted)
    code_revisions.cache_clear()
    for _ in range(3):
        assert await ensure_schema(database, migrate=True) == head_revision()
        assert await ensure_schema(database, migrate=False) == head_revision()
    assert len(reads) == 1


async def test_ensure_schema_refuses_an_unknown_revision(database: Database) -> None:
    async with database.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(SchemaAheadError, match="9999_from_the_future"):
        await ensure_schema(database, migrate=True)


async def test_ensure_schema_refuses_a_revision_a_newer_controller_migrated_to_while_it_waited(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read before the migration lock, the revision was one this code knows; a newer controller
    holding the lock then migrated past this code's head. Told as a migration that did not fit
    ("repair that, or restore a backup"), not as a newer schema to run that version for."""
    from controller.store import migrate

    async with database.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    read = migrate._current_revision
    reads: list[str | None] = []

    def before_the_lock_then_as_stored(connection: Connection) -> str | None:
        reads.append(read(connection))
        return min(code_revisions().known) if len(reads) == 1 else reads[-1]

    monkeypatch.setattr(migrate, "_current_revision", before_the_lock_then_as_stored)
    with pytest.raises(SchemaAheadError, match="9999_from_the_future"):
        await ensure_schema(database, migrate=True)
    assert len(reads) == 2


def test_offline_sql_is_emitted_for_postgresql_and_refused_at_once_for_sqlite(db_url: str, capsys) -> None:
    """`alembic upgrade head --sql` on SQLite failed at 0009 (a batch table rebuild needs the
    live database), after printing the SQL of the revisions before it."""
    if db_url.startswith("sqlite"):
        with pytest.raises(SystemExit, match="for PostgreSQL only"):
            command.upgrade(alembic_config(db_url), "head", sql=True)
        assert "CREATE TABLE" not in capsys.readouterr().out
    else:
        command.upgrade(alembic_config(db_url), "head", sql=True)
        out = capsys.readouterr().out
        assert "CREATE TABLE deployments" in out and head_revision() in out


async def test_sqlite_foreign_keys_stay_on_after_migrating(tmp_path: Path) -> None:
    # Migrations run with foreign keys off (batch table rebuilds); pooled connections must not.
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'fk.db'}")
    try:
        await ensure_schema(db, migrate=True)
        async with db.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        await db.dispose()


async def _query_plan(conn: AsyncConnection, sql: str) -> str:
    """The database's plan for `sql`, one string; on PostgreSQL with sequential scans off (on an
    empty table a scan is what it picks unless told not to)."""
    if conn.dialect.name == "sqlite":
        rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
        return " ".join(str(r[-1]) for r in rows)
    await conn.exec_driver_sql("SET enable_seqscan = off")
    rows = await conn.exec_driver_sql(f"EXPLAIN {sql}")
    return " ".join(str(r[0]) for r in rows)


async def test_a_deployment_named_without_its_tenant_is_found_through_an_index(db_url: str) -> None:
    """An admin's watch or `maiactl wait NAME` without a tenant looks a deployment up by name alone,
    which the (tenant_id, name) unique index cannot serve (migration 0015)."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            plan = await _query_plan(conn, "SELECT id FROM deployments WHERE name = 'chat'")
        assert "ix_deployments_name" in plan, plan
    finally:
        await db.dispose()


async def test_lookups_by_tenant_and_by_deployment_go_through_the_unique_indexes(db_url: str) -> None:
    """Migration 0025 dropped `ix_deployments_tenant_id` and `ix_placements_deployment_id`: a
    tenant's deployments and a deployment's placements are still found through an index, the
    unique one that leads with the column, and neither dropped index is there to be written."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            by_tenant = await _query_plan(conn, "SELECT id FROM deployments WHERE tenant_id = 'acme'")
            by_deployment = await _query_plan(conn, "SELECT id FROM placements WHERE deployment_id = 7")
            indexes = await conn.run_sync(lambda sync: {
                index["name"] for table in ("deployments", "placements")
                for index in inspect(sync).get_indexes(table)})
        # A unique constraint's index: SQLite's sqlite_autoindex_<table>_N, PostgreSQL's uq_<table>_<columns>.
        assert any(name in by_tenant for name in ("sqlite_autoindex_deployments", "uq_deployments_tenant_id_name")), by_tenant
        assert any(name in by_deployment for name in ("sqlite_autoindex_placements",
                                                      "uq_placements_deployment_id_replica_shard")), by_deployment
        assert not indexes & {"ix_deployments_tenant_id", "ix_placements_deployment_id"}, indexes
    finally:
        await db.dispose()


async def test_a_lease_row_written_before_agent_addresses_still_names_the_leader(db_url: str) -> None:
    """Migration 0018: a row an older controller wrote says no agent address; followers send the
    agents to the leader's `address`, as before."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), "0017_count_trigger_rows")
    db = Database(db_url)
    try:
        async with db.unit_of_work() as uow:
            await uow.session.execute(text("UPDATE leader_lease SET holder = 'old', token = 1, "
                                           "expires_at = 1e12, address = 'old:50051' WHERE id = 1"))
            await uow.session.commit()
        await asyncio.to_thread(command.upgrade, alembic_config(db_url), "head")
        async with db.unit_of_work() as uow:
            row = await lease.read(uow.session)
        assert (row.holder, row.address, row.agent_address, row.live) == ("old", "old:50051", "", True)
        follower = LeaderElection(db, address="new:50051", agent_address="new:7000", holder="new")
        await follower.step()
        with pytest.raises(NotLeader) as refused:
            follower.require_leader()
        assert refused.value.metadata == (("maia-leader", "old:50051"),)
    finally:
        await db.dispose()


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_the_command_lines_upgrade_takes_the_controllers_migration_lock(db_url: str) -> None:
    """`alembic upgrade head` (a Kubernetes Job) and a controller starting with --migrate never
    migrate at once: the one second failed "already exists", with a misleading hint."""
    from .migrating import holding_the_migration_lock

    db = Database(db_url)
    try:
        await holding_the_migration_lock(db_url, db)
        async with db.unit_of_work() as uow:
            assert await uow.session.scalar(text("SELECT count(*) FROM alembic_version")) == 1
    finally:
        await db.dispose()
