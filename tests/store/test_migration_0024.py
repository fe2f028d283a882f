"""Migration 0024 (deployment ids never reused) on data, on SQLite and PostgreSQL.

Under 0023 SQLite gave the id of the deployment deleted last to the next one inserted; from 0024 on
no id is handed out twice, on either backend. SQLite rebuilds the table: its rows, the rows that
point at them, its triggers and its indexes come through, and a downgrade restores the old shape.
"""

from __future__ import annotations

import pytest

from controller.store.db import Database

from .test_migration_0010 import NOW, _add_deployment, _add_tenant, _downgrade, _run, _upgrade

BEFORE, REVISION = "0023_capacity_lock_order", "0024_deployment_ids_never_reused"


async def _ids(db: Database) -> dict[str, int]:
    return dict(await _run(db, "SELECT name, id FROM deployments"))  # type: ignore[arg-type]


async def _replaced(db: Database, gone: str, new: str) -> tuple[int, int]:
    """(the id of `gone`, deleted, the largest; that of `new`, inserted next)."""
    old = (await _ids(db))[gone]
    await _run(db, "DELETE FROM deployments WHERE name = :name", name=gone)
    await _add_deployment(db, "lab-a", new)
    return old, (await _ids(db))[new]


async def _counted(db: Database) -> int:
    [(count,)] = await _run(db, "SELECT deployments FROM tenant_deployment_counts WHERE tenant_id = 'lab-a'")
    return int(count)


async def _shape(db: Database) -> tuple[list[tuple], bool]:
    """SQLite: the table's triggers and indexes as created, and whether its ids autoincrement."""
    objects = await _run(db, "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'deployments' "
                             "AND type IN ('trigger', 'index') AND sql IS NOT NULL ORDER BY type, name")
    [(table,)] = await _run(db, "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'deployments'")
    return objects, "AUTOINCREMENT" in table


async def test_a_deleted_deployments_id_is_never_given_to_another(db_url: str) -> None:
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    sqlite = db_url.startswith("sqlite")
    try:
        await _add_tenant(db, "lab-a")
        for name in ("chat", "train", "batch"):
            await _add_deployment(db, "lab-a", name)
        freed, taken = await _replaced(db, "batch", "eval")
        assert (taken == freed) is sqlite  # before: SQLite's rowid took the freed largest id
        await _run(db, "INSERT INTO client_requests (tenant_id, request_id, deployment_id, deployment_name, action, "
                       "spec_sha256, created_at) SELECT 'lab-a', 'r1', id, name, 'submit', '', :now FROM deployments "
                       "WHERE name = 'eval'", now=NOW)
        shape = await _shape(db) if sqlite else None
        ids = await _ids(db)

        await _upgrade(db_url, REVISION)
        assert await _ids(db) == ids
        # The rebuild (SQLite) kept the rows that point at deployments (no cascade, no SET NULL).
        assert await _run(db, "SELECT deployment_id FROM client_requests") == [(ids["eval"],)]
        if sqlite and shape is not None:
            assert await _shape(db) == (shape[0], True)  # the same triggers and indexes
        counted = await _counted(db)
        freed, taken = await _replaced(db, "eval", "serve")
        assert taken > freed  # after: never the freed id
        await _add_deployment(db, "lab-a", "tune")
        assert await _counted(db) == counted + 1  # the count triggers still fire (a deletion, an insert each)

        ids = await _ids(db)
        await _downgrade(db_url, BEFORE)
        assert await _ids(db) == ids
        if sqlite and shape is not None:
            assert await _shape(db) == (shape[0], False)
        freed, taken = await _replaced(db, "tune", "last")
        assert (taken == freed) is sqlite
    finally:
        await db.dispose()


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_downgrade_gives_back_the_schema_as_0023_had_it(db_url: str) -> None:
    """SQLite: every object of the schema (the table's CREATE statement included: its primary key's
    name, its columns as written) is stored after 0024's upgrade and downgrade exactly as at 0023,
    but `sqlite_sequence`, which SQLite keeps once created (left empty: the table's row went with it)."""
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        await _add_tenant(db, "lab-a")
        for name in ("chat", "train"):
            await _add_deployment(db, "lab-a", name)
        schema, ids = await _schema(db), await _ids(db)
        assert "CONSTRAINT pk_deployments PRIMARY KEY (id)" in str(schema[("table", "deployments")][1])

        await _upgrade(db_url, REVISION)
        await _downgrade(db_url, BEFORE)
        assert await _schema(db) == schema
        assert await _ids(db) == ids
        assert await _run(db, "SELECT name, seq FROM sqlite_sequence") == []
    finally:
        await db.dispose()


async def _schema(db: Database) -> dict[tuple[str, str], tuple[str, str | None]]:
    """SQLite: each object's (table, CREATE statement), by (type, name), but `sqlite_sequence`'s."""
    return {(kind, name): (table, sql) for kind, name, table, sql in await _run(
        db, "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name <> 'sqlite_sequence'")}
