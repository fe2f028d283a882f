"""Migration 0030 (what a tenant's id had used when its customer was created) on SQLite and
PostgreSQL: two nullable columns, NULL for the tenants already there (they keep reading the
intervals before their creation); up and down leave the tenants' triggers in place (a table copy
would drop them on SQLite)."""

from __future__ import annotations

from controller.store.db import Database

from .test_migration_0010 import _add_tenant, _downgrade, _run, _upgrade

BEFORE, REVISION = "0029_shard_phase_unknown", "0030_tenant_usage_before"


async def test_the_columns_come_and_go_and_the_tenants_triggers_stay(db_url: str) -> None:
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        await _add_tenant(db, "old-lab")
        await _upgrade(db_url, REVISION)
        assert await _run(db, "SELECT id, usage_before_accelerator_s, usage_before_energy_j FROM tenants") == [
            ("old-lab", None, None)]
        await _add_tenant(db, "new-lab")  # the known_tenants trigger still fires
        await _downgrade(db_url, BEFORE)
        await _add_tenant(db, "later-lab")
        assert sorted(r[0] for r in await _run(db, "SELECT id FROM known_tenants")) == [
            "later-lab", "new-lab", "old-lab"]
        await _upgrade(db_url, REVISION)
    finally:
        await db.dispose()
