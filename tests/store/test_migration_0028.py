"""Migration 0028 (closed_usage) on data, on SQLite and PostgreSQL.

The upgrade sums the intervals already closed per (tenant, accelerator model, zone), leaves the
open ones to the readers, and from then on the triggers add each close (and each row inserted
closed); usage to date equals the whole history. A downgrade removes the tables and triggers,
and intervals close as before.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import inspect

from controller.store import metering
from controller.store.db import Database

from .test_migration_0010 import _downgrade, _run, _upgrade

BEFORE, REVISION = "0027_known_tenants", "0028_closed_usage"
NOW_S = 1_796_000_000.0


async def _interval(db: Database, placement: int, tenant: str, model: str, zone: str, milli: int,
                    started_s: float, ended_s: float | None) -> None:
    await _run(db, "INSERT INTO usage_intervals (placement_id, tenant_id, deployment, replica, shard, node_id, "
                   "zone_id, accelerator_model, accelerator_milli, load_power_w, idle_share_w, started_s, ended_s) "
                   "VALUES (:p, :t, 'chat', 0, 0, 'n1', :z, :model, :milli, 400, 50, :s, :e)",
               p=placement, t=tenant, z=zone, model=model, milli=milli, s=started_s, e=ended_s)


async def _closed_usage(db: Database) -> dict[tuple[str, str, str], tuple[float, float]]:
    return {(t, model, z): (a, j) for t, model, z, a, j in await _run(
        db, "SELECT tenant_id, accelerator_model, zone_id, accelerator_seconds, energy_j FROM closed_usage")}


async def _to_date_is_the_history(db: Database) -> None:
    now = datetime.fromtimestamp(NOW_S + 86_400, tz=timezone.utc)
    group = ("tenant", "accelerator_model", "zone")
    async with db.unit_of_work() as uow:
        whole = {(t.tenant, t.accelerator_model, t.zone): pytest.approx((t.accelerator_seconds, t.energy_j))
                 for t in await metering.usage_by(uow.session, group, now=now)}
        assert {(t.tenant, t.accelerator_model, t.zone): (t.accelerator_seconds, t.energy_j)
                for t in await metering.usage_to_date(uow.session, group, now=now)} == whole


async def test_the_upgrade_sums_the_closed_intervals_and_the_triggers_add_every_close(db_url: str) -> None:
    await _upgrade(db_url, BEFORE)
    db = Database(db_url)
    try:
        await _interval(db, 1, "lab", "a100", "z1", 1000, NOW_S - 3600, NOW_S - 1800)  # 1800 s x 1
        await _interval(db, 2, "lab", "a100", "z1", 250, NOW_S - 3600, NOW_S)  # 3600 s x 0.25
        await _interval(db, 3, "web", "h100", "z2", 2000, NOW_S - 100, NOW_S)  # 100 s x 2
        await _interval(db, 4, "web", "h100", "z2", 1000, NOW_S - 50, None)  # open: not summed
        await _upgrade(db_url, REVISION)
        assert await _closed_usage(db) == {("lab", "a100", "z1"): pytest.approx((2700.0, 5400 * 450.0)),
                                           ("web", "h100", "z2"): pytest.approx((200.0, 100 * 450.0))}
        await _to_date_is_the_history(db)

        await _run(db, "UPDATE usage_intervals SET ended_s = :e WHERE placement_id = 4", e=NOW_S + 50)  # a close
        await _interval(db, 5, "ops", "a100", "z1", 500, NOW_S, NOW_S + 10)  # inserted closed
        assert await _closed_usage(db) == {("lab", "a100", "z1"): pytest.approx((2700.0, 5400 * 450.0)),
                                           ("web", "h100", "z2"): pytest.approx((300.0, 200 * 450.0)),
                                           ("ops", "a100", "z1"): pytest.approx((5.0, 10 * 450.0))}
        await _to_date_is_the_history(db)

        await _downgrade(db_url, BEFORE)
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert "closed_usage" not in tables and "closed_usage_deltas" not in tables
        await _interval(db, 6, "ops", "a100", "z1", 500, NOW_S, None)  # no trigger left behind
        await _run(db, "UPDATE usage_intervals SET ended_s = :e WHERE placement_id = 6", e=NOW_S + 5)
        await _upgrade(db_url, REVISION)  # and up again: the sums from the rows
        assert (await _closed_usage(db))[("ops", "a100", "z1")] == pytest.approx((7.5, 15 * 450.0))
    finally:
        await db.dispose()
