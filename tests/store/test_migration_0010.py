"""Migration 0010 (deployment names per tenant) on data, on SQLite and PostgreSQL.

Names stored under 0009 were unique in the cluster; after the upgrade they are unique per
tenant, the events of existing deployments name them TENANT/NAME, and the isolation-version
triggers on `deployments` still fire (SQLite rebuilds the table). A downgrade is refused while
two tenants share a name, and otherwise restores the old shape.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from controller.store.db import Database
from controller.store.migrate import alembic_config

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
BEFORE, REVISION = "0009_request_ids_kept", "0010_deployment_names_per_tenant"


async def _upgrade(db_url: str, revision: str) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(db_url), revision)


async def _downgrade(db_url: str, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(db_url), revision)


async def _run(db: Database, sql: str, **params: object) -> list[tuple]:
    async with db.engine.begin() as conn:
        result = await conn.execute(text(sql), params)
        return [tuple(r) for r in result] if result.returns_rows else []


async def _add_tenant(db: Database, tenant: str) -> None:
    await _run(db, "INSERT INTO tenants (id, isolation, excludes, zones, created_at, updated_at) "
                   "VALUES (:id, 'shared', '[]', '[]', :now, :now)", id=tenant, now=NOW)


async def _add_deployment(db: Database, tenant: str, name: str) -> None:
    await _run(db, "INSERT INTO deployments (name, tenant_id, replicas, min_replicas, shards_per_replica, "
                   "shard_accelerators, shard_accelerator_milli, shard_hbm_gib, shard_cpu_milli, shard_memory_mib, "
                   "shard_power_w, shard_accelerator_models, locality, priority, preemptible, phase, reasons, "
                   "generation, created_at, updated_at) VALUES (:name, :tenant, 1, 1, 1, 1, 1000, 0, 0, 0, 0, '[]', "
                   "'rack', 0, :no, 'pending', '[]', 0, :now, :now)", name=name, tenant=tenant, no=False, now=NOW)


async def _add_event(db: Database, object_id: str, kind: str = "deployment.submitted") -> None:
    await _run(db, "INSERT INTO events (at, actor, kind, object_kind, object_id, message, data) "
                   "VALUES (:now, 'test', :kind, 'deployment', :id, '', '{}')", now=NOW, id=object_id, kind=kind)


async def _event_ids(db: Database) -> list[str]:
    return [r[0] for r in await _run(db, "SELECT object_id FROM events ORDER BY id")]


async def _isolation_version(db: Database) -> int:
    return (await _run(db, "SELECT version FROM isolation_state WHERE id = 1"))[0][0]


async def test_names_become_unique_per_tenant_with_data(db_url: str) -> None:
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        for tenant in ("lab-a", "lab-b"):
            await _add_tenant(db, tenant)
        # An earlier `chat` (lab-b's, say) submitted and deleted: its history is not lab-a's.
        await _add_event(db, "chat")
        await _add_event(db, "chat", "deployment.deleted")
        await _add_deployment(db, "lab-a", "chat")
        await _add_event(db, "chat")
        await _add_event(db, "long-gone")  # a deleted deployment's history: its tenant is unknown
        with pytest.raises(IntegrityError):  # before: one `chat` in the whole cluster
            await _add_deployment(db, "lab-b", "chat")

        await _run(db, "INSERT INTO client_requests (tenant_id, request_id, deployment_id, deployment_name, action, "
                       "spec_sha256, created_at) SELECT 'lab-a', 'r1', id, name, 'submit', '', :now FROM deployments",
                   now=NOW)

        await _upgrade(db_url, REVISION)
        assert await _event_ids(db) == ["chat", "chat", "lab-a/chat", "long-gone"]
        # The table rebuild (SQLite) kept the rows that point at deployments (no cascade, no SET NULL).
        assert await _run(db, "SELECT COUNT(*) FROM client_requests WHERE deployment_id IS NOT NULL") == [(1,)]
        version = await _isolation_version(db)
        await _add_deployment(db, "lab-b", "chat")  # another tenant's `chat`: allowed now
        assert await _isolation_version(db) > version  # the triggers survived the table rebuild
        with pytest.raises(IntegrityError):  # the same tenant's: still refused
            await _add_deployment(db, "lab-b", "chat")

        with pytest.raises(Exception, match="several tenants"):
            await _downgrade(db_url, BEFORE)
        await _run(db, "DELETE FROM deployments WHERE tenant_id = 'lab-b'")
        await _downgrade(db_url, BEFORE)
        assert await _event_ids(db) == ["chat", "chat", "chat", "long-gone"]
        with pytest.raises(IntegrityError):
            await _add_deployment(db, "lab-b", "chat")
    finally:
        await db.dispose()
