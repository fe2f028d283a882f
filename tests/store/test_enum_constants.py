"""The enum columns compare with their members inline (`store/enumtype.py`): PostgreSQL's generic
plan of a statement then still knows which phases it keeps."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.dialects import postgresql, sqlite

from bench.pgserver import asyncpg_dsn
from bench.preload import Layout, preload
from controller.store.db import Database
from controller.store.models import Deployment, DeploymentPhase, Node, NodeHealth, Placement, ShardPhase, utcnow
from controller.store.rollout import retire_replaced

DIALECTS = [postgresql.asyncpg.dialect(), sqlite.dialect()]


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_member_compared_is_a_constant_of_the_text(dialect: Any) -> None:
    leaving = [DeploymentPhase.DELETING, DeploymentPhase.QUARANTINED]
    cases = [
        (select(Deployment.id).where(Deployment.phase.not_in(leaving)),
         "deployments.phase NOT IN ('deleting', 'quarantined')"),
        (select(Deployment.id).where(Deployment.__table__.c.phase != DeploymentPhase.QUARANTINED),
         "deployments.phase != 'quarantined'"),
        (select(Node.id).where(Node.health == NodeHealth.UP), "nodes.health = 'up'"),
        (select(Placement.id).where(Placement.phase == ShardPhase.FAILED), "placements.phase = 'failed'"),
    ]
    for statement, rendered in cases:
        compiled = statement.compile(dialect=dialect)
        assert rendered in str(compiled)
        assert not any(name.startswith(("phase", "health")) for name in compiled.params), compiled.params


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_what_is_not_a_member_stays_bound(dialect: Any) -> None:
    """A string, a list with a string, a value set: parameters as before (a member does not
    become a literal where the statement is written, only where it is compared)."""
    statements = [
        select(Node.id).where(Node.health == "up"),
        select(Deployment.id).where(Deployment.phase.in_([DeploymentPhase.RUNNING, "pending"])),
        update(Placement).where(Placement.id == 1).values(phase=ShardPhase.RUNNING),
    ]
    for statement in statements:
        compiled = statement.compile(dialect=dialect)
        assert "'running'" not in str(compiled) and "'up'" not in str(compiled)
        assert compiled.params


async def test_the_rollout_scan_keeps_its_estimate_under_a_generic_plan(db_url: str, db_backend: str) -> None:
    """Every deployment running (the phase's statistics hold that one value): a generic plan of
    the rollout's scan, `phase NOT IN ($1, $2)`, estimated it kept 1 of 400 deployments and
    joined the placements to them by nested loops; with the phases in its text it knows all 400
    are kept."""
    if db_backend == "sqlite":
        pytest.skip("SQLite plans each statement for its values; no generic plans")
    import asyncpg

    await preload(db_url, Layout((("rack-", 10),), 10), placements=400, tenants=["lab-a"], nodes_up=True)
    db = Database(db_url)
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        async with db.unit_of_work() as uow:
            assert not (await retire_replaced(uow.session, now=utcnow() + timedelta(seconds=1))).deployments
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
        await db.dispose()
    scan, parameters = sent[0]  # the scan of every placement for outgoing replicas
    assert "placements" in scan and "deployments" in scan
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        await conn.execute(f"PREPARE scan AS {scan}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        values = ", ".join("'" + str(getattr(p, "value", p)).replace("'", "''") + "'" for p in parameters or ())
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE scan{f'({values})' if values else ''}"))
    finally:
        await conn.close()
    estimates = [node["Plan Rows"] for node in _nodes(plan[0]["Plan"]) if node.get("Relation Name") == "deployments"]
    assert estimates and min(estimates) >= 200, plan


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", ()) for n in _nodes(child))]
