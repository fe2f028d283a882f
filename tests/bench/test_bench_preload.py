"""`bench.preload`: the cluster and its running work written straight into a database, which on
PostgreSQL then has the planner's statistics a running cluster's autovacuum keeps."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from bench.preload import Layout, preload
from controller.store.db import Database

LAYOUT = Layout((("rack-", 2),), 4)  # 8 nodes of 4 accelerators


async def test_a_preloaded_cluster_holds_its_running_work(db_url: str) -> None:
    await preload(db_url, LAYOUT, placements=20, tenants=["lab-a"])
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            counts = [(await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
                      for table in ("nodes", "deployments", "placements")]
    finally:
        await db.dispose()
    assert counts == [8, 20, 20]


async def test_on_postgresql_the_planner_knows_the_preloaded_rows(db_url: str, db_backend: str) -> None:
    """Without an ANALYZE the planner guessed the tables' sizes from their pages until autovacuum's
    next round, and hashed every placement to join a dozen deployments (docs/benchmarks.md,
    `analyze`)."""
    if db_backend == "sqlite":
        pytest.skip("SQLite keeps no planner statistics unless asked; preload leaves it so")
    await preload(db_url, LAYOUT, placements=20, tenants=["lab-a"])
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            known = dict((await conn.execute(text(
                "SELECT relname, reltuples FROM pg_class WHERE relname IN ('nodes', 'deployments', 'placements')"
            ))).all())
    finally:
        await db.dispose()
    assert known == {"nodes": 8, "deployments": 20, "placements": 20}
