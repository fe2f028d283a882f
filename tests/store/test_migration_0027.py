"""Migration 0027 (known_tenants) on data, on SQLite and PostgreSQL.

The upgrade knows every tenant the database still names (the tenants, a deleted tenant's events,
a metered tenant, a successful CreateTenant of the audit log; not a refused one); from then on a
trigger adds every tenant inserted, and nothing removes one: a tenant deleted stays known, and one
created again under its old id is no conflict. A downgrade removes the table and its trigger.
"""

from __future__ import annotations

import asyncio

import pytest
from alembic import command
from sqlalchemy import inspect, text

from controller.store.db import Database
from controller.store.migrate import alembic_config

from .migrating import upgrade_past
from .test_migration_0010 import NOW, _add_tenant, _downgrade, _run, _upgrade

BEFORE, REVISION = "0026_lease_fence_function", "0027_known_tenants"


async def _tenant_event(db: Database, kind: str, tenant: str) -> None:
    await _run(db, "INSERT INTO events (at, actor, kind, object_kind, object_id, message, data) "
                   "VALUES (:now, 'admin', :kind, 'tenant', :id, '', '{}')", now=NOW, kind=kind, id=tenant)


async def _metered(db: Database, tenant: str) -> None:
    await _run(db, "INSERT INTO usage_intervals (placement_id, tenant_id, deployment, replica, shard, node_id, "
                   "zone_id, accelerator_model, accelerator_milli, load_power_w, idle_share_w, started_s, ended_s) "
                   "VALUES (1, :t, 'chat', 0, 0, 'n1', 'z1', 'maia-100', 1000, 400, 50, 0, 10)", t=tenant)


async def _audited_create(db: Database, seq: int, tenant: str, outcome: str) -> None:
    await _run(db, "INSERT INTO audit_log (seq, at, request_id, actor, role, tenant, action, object_kind, "
                   "object_id, outcome, detail, prev_hash, hash) VALUES (:seq, :now, 'r', 'admin', 'admin', :t, "
                   "'/maia.v1.AdminService/CreateTenant', 'tenant', :t, :outcome, '{}', :h, :h)",
               seq=seq, now=NOW, t=tenant, outcome=outcome, h="0" * 64)


async def _known(db: Database) -> set[str]:
    return {row[0] for row in await _run(db, "SELECT id FROM known_tenants")}


async def test_every_tenant_ever_named_is_known_and_stays_known(db_url: str) -> None:
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        for tenant in ("lab-a", "lab-b"):
            await _add_tenant(db, tenant)
        for kind in ("tenant.created", "tenant.deleted"):
            await _tenant_event(db, kind, "gone")
        await _metered(db, "metered")
        await _audited_create(db, 1, "audited", "OK")
        await _audited_create(db, 2, "refused", "INVALID_ARGUMENT")

        await _upgrade(db_url, REVISION)
        assert await _known(db) == {"lab-a", "lab-b", "gone", "metered", "audited"}

        await _add_tenant(db, "lab-new")
        await _run(db, "DELETE FROM tenants WHERE id = 'lab-a'")
        assert await _known(db) == {"lab-a", "lab-b", "lab-new", "gone", "metered", "audited"}
        await _add_tenant(db, "lab-a")  # created again under its old id
        await _add_tenant(db, "gone")
        assert len(await _known(db)) == 6

        await _downgrade(db_url, BEFORE)
        async with db.engine.connect() as conn:
            assert "known_tenants" not in await conn.run_sync(lambda c: inspect(c).get_table_names())
        await _add_tenant(db, "lab-c")  # no trigger left behind
    finally:
        await db.dispose()


@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_tenant_created_while_the_migration_runs_is_known(db_url: str) -> None:
    """PostgreSQL, migrated by a Job while an older controller serves: a tenant inserted as the
    migration starts, committed while it waits for its lock on `tenants`, is known (filled before
    the trigger was made, it was in neither, and its id was never redacted)."""
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), BEFORE)
    db = Database(db_url)
    try:
        async with db.unit_of_work() as writer:  # an older controller's CreateTenant, not committed yet
            await writer.session.execute(text(
                "INSERT INTO tenants (id, isolation, excludes, zones, created_at, updated_at) "
                "VALUES ('delta-labs', 'shared', '[]', '[]', :now, :now)"), {"now": NOW})
            await upgrade_past(writer, db_url, db, "tenants")
        assert await _known(db) == {"delta-labs"}
    finally:
        await db.dispose()
