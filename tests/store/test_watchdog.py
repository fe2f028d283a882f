"""The isolation watchdog: a placement that breaks isolation, written into the database by hand,
raises an alarm (ERROR log, event, audit entry, counters) within seconds, once per violation."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy import select, text

from controller.store import audit
from controller.store import models as m
from controller.store.db import Database
from controller import watchdog as watchdog_module
from controller.domain.changes import ClusterChange
from controller.store.changes import bump_cluster_generation
from controller.watchdog import EVENT_KIND, IsolationWatchdog

from .seed import TWO_RACKS, seed_problem

# Tenant "solo" is dedicated_node; "lab" and "rival" exclude each other; "eu" may run in z1 only.
CLUSTER: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": f"n{i}", "rack": "rack1" if i < 3 else "rack2", "accelerators": 4, "hbm_gib": 64}
              for i in range(1, 5)],
    "tenants": [{"id": "solo", "isolation": "dedicated_node"}, {"id": "lab", "excludes": ["rival"]},
                {"id": "rival"}, {"id": "eu", "zones": ["z1"]}],
    "deployments": [
        {"id": f"{t}-web", "tenant": t, "replicas": 2, "shards_per_replica": 1, "shard": {"accelerators": 1}}
        for t in ("solo", "lab", "rival", "eu")
    ],
    "placements": [
        {"deployment": "solo-web", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]},
        {"deployment": "lab-web", "replica": 0, "shard": 0, "node": "n2", "accelerator_indices": [0]},
        {"deployment": "rival-web", "replica": 0, "shard": 0, "node": "n3", "accelerator_indices": [0]},
    ],
}


async def _seeded(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, CLUSTER)
        await uow.commit()


async def _place_by_hand(database: Database, deployment: str, node: str, indices: str) -> None:
    """The attack: a placement row INSERTed directly, bypassing the controller."""
    async with database.engine.begin() as conn:
        dep_id = (await conn.execute(text("SELECT id FROM deployments WHERE name = :n"), {"n": deployment})).scalar_one()
        await conn.execute(text(
            "INSERT INTO placements (deployment_id, replica, shard, node_id, accelerator_indices, phase, message, "
            "generation, updated_at) VALUES (:d, 1, 0, :node, :idx, 'running', '', 0, CURRENT_TIMESTAMP)"),
            {"d": dep_id, "node": node, "idx": indices})


async def test_a_clean_cluster_raises_nothing(database: Database) -> None:
    await _seeded(database)
    watchdog = IsolationWatchdog(database)
    assert await watchdog.check_once() == []
    assert (watchdog.checks_total, watchdog.alarms_total, watchdog.active_violations) == (1, 0, 0)


async def test_a_hand_written_violation_alarms_once_and_again_after_it_clears(
        database: Database, caplog: pytest.LogCaptureFixture) -> None:
    await _seeded(database)
    watchdog = IsolationWatchdog(database)
    await _place_by_hand(database, "lab-web", "n1", "[1]")  # lab next to the dedicated_node tenant solo

    with caplog.at_level(logging.ERROR, logger="maia.watchdog"):
        alarms = await watchdog.check_once()
    assert [(a.violation.rule, a.violation.scope, a.violation.tenants) for a in alarms] == [
        ("ISOLATION", "node n1", ("lab", "solo"))]
    assert "isolation violation ISOLATION at node n1" in caplog.text
    assert watchdog.alarms_total == 1 and watchdog.last_alarm == alarms[0]
    async with database.unit_of_work() as uow:
        events = (await uow.session.execute(select(m.Event).where(m.Event.kind == EVENT_KIND))).scalars().all()
        assert [(e.object_kind, e.object_id, e.data["tenants"]) for e in events] == [("node", "n1", ["lab", "solo"])]
        entries = await audit.list_entries(uow.session)
        assert [(e.action, e.tenant, e.outcome) for e in entries] == [
            (EVENT_KIND, "lab", "VIOLATION"), (EVENT_KIND, "solo", "VIOLATION")]
        assert (await audit.verify_chain(uow.session)).intact

    assert await watchdog.check_once() == []  # still there: no second alarm
    assert (watchdog.alarms_total, watchdog.active_violations) == (1, 1)
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM placements WHERE replica = 1"))
    assert await watchdog.check_once() == [] and watchdog.active_violations == 0
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    assert len(await watchdog.check_once()) == 1 and watchdog.alarms_total == 2


@pytest.mark.parametrize("deployment, node, indices, rule, tenants", [
    ("rival-web", "n2", "[0]", "ACCELERATOR", ("lab", "rival")),   # two tenants on one accelerator
    ("rival-web", "n2", "[1]", "EXCLUSION", ("lab", "rival")),     # excluded tenants in one rack
    ("solo-web", "n1", "[0]", "ACCELERATOR", ("solo",)),           # a whole accelerator held twice
    ("lab-web", "n2", "[7]", "REFERENCE", ("lab",)),                # an index the node does not have
])
async def test_each_rule_is_caught(database: Database, deployment: str, node: str, indices: str, rule: str,
                                   tenants: tuple[str, ...]) -> None:
    await _seeded(database)
    await _place_by_hand(database, deployment, node, indices)
    alarms = await IsolationWatchdog(database).check_once()
    assert [(a.violation.rule, a.violation.tenants) for a in alarms][:1] == [(rule, tenants)]


async def test_the_running_watchdog_alarms_within_seconds(database: Database) -> None:
    await _seeded(database)
    watchdog = IsolationWatchdog(database, interval_s=0.1)
    task = asyncio.create_task(watchdog.run())
    try:
        while watchdog.checks_total == 0:
            await asyncio.sleep(0.05)
        await _place_by_hand(database, "lab-web", "n1", "[1]")
        await asyncio.wait_for(_until(lambda: watchdog.alarms_total == 1), timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    while not condition():
        await asyncio.sleep(0.05)


async def test_only_changes_the_rules_read_cause_a_full_check(database: Database) -> None:
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, full_every_s=60, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == [] and watchdog.checks_total == 1
    assert await watchdog.check_if_changed() is None and watchdog.skipped_total == 1

    async with database.engine.begin() as conn:  # agents' reports and heartbeats do not count
        await conn.execute(text("UPDATE placements SET phase = 'failed', message = 'oom'"))
        await conn.execute(text("UPDATE nodes SET power_draw_w = 900, last_heartbeat_at = CURRENT_TIMESTAMP"))
    assert await watchdog.check_if_changed() is None and watchdog.checks_total == 1

    now[0] = 30.0  # (later than the last check's cost allows: see the next test)
    async with database.engine.begin() as conn:  # a hand edit of where a shard runs does
        await conn.execute(text("UPDATE placements SET node_id = 'n1', accelerator_indices = '[1]' "
                                "WHERE node_id = 'n2'"))
    alarms = await watchdog.check_if_changed()
    assert watchdog.checks_total == 2 and [a.violation.rule for a in alarms] == ["ISOLATION"]
    assert await watchdog.check_if_changed() is None

    now[0] = 91.0  # and a full check runs once a minute regardless (dropped triggers)
    assert await watchdog.check_if_changed() == [] and watchdog.checks_total == 3


async def test_under_churn_checks_take_at_most_their_share_of_the_time(database: Database) -> None:
    """A full check reads every placement: after one that cost 1 s, with `max_share` 0.05, a
    change waits until 20 s after it, and is checked then."""
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, max_share=0.05, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == [] and watchdog.checks_total == 1
    watchdog.last_full_ms = 1000.0  # as if that check had taken a second
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    now[0] = 19.0
    assert await watchdog.check_if_changed() is None
    assert watchdog.checks_total == 1 and watchdog.deferred_total == 1 and watchdog.alarms_total == 0
    now[0] = 20.5
    alarms = await watchdog.check_if_changed()
    assert watchdog.checks_total == 2 and [a.violation.rule for a in alarms] == ["ISOLATION"]


async def test_a_deletion_committed_while_the_watchdog_reads_raises_no_false_alarm(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog reads deployments first, then the placements. A deployment deleted (its
    placements with it) in between must not look like placements of a missing deployment
    (REFERENCE), nor be forgotten while its placements are read: the whole read is one snapshot.
    Seen on PostgreSQL under `bench e2e`."""
    await _seeded(database)
    real_read = watchdog_module.read_contracts

    async def read_with_a_deletion_in_between(session: Any) -> Any:
        real_execute = session.execute
        deleted = False

        async def execute(statement: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal deleted
            result = await real_execute(statement, *args, **kwargs)
            if not deleted and "FROM deployments" in str(statement):
                deleted = True
                result = list(result)  # the page is read; now someone deletes a deployment
                async with database.engine.begin() as conn:
                    dep_id = (await conn.execute(text("SELECT id FROM deployments WHERE name = 'rival-web'"))).scalar_one()
                    await conn.execute(text("DELETE FROM placements WHERE deployment_id = :d"), {"d": dep_id})
                    await conn.execute(text("DELETE FROM deployments WHERE id = :d"), {"d": dep_id})
            return result

        monkeypatch.setattr(session, "execute", execute)
        return await real_read(session)

    monkeypatch.setattr(watchdog_module, "read_contracts", read_with_a_deletion_in_between)
    watchdog = IsolationWatchdog(database)
    assert await watchdog.check_once() == []
    monkeypatch.undo()
    async with database.unit_of_work() as uow:  # the deletion did commit, during the read
        assert (await uow.session.execute(text("SELECT count(*) FROM deployments WHERE name = 'rival-web'"))).scalar_one() == 0
    assert await watchdog.check_once() == []  # and the next check sees it gone, cleanly


async def test_a_check_judges_rows_changed_by_hand_since_the_last_one_as_they_are_now(database: Database) -> None:
    # Each row's model is built once and kept while the row is unchanged (`isolation.ModelMemo`):
    # a deployment renamed by hand keeps its placements' references whole (no false REFERENCE
    # alarm), and a placement moved by hand is judged where it is now.
    await _seeded(database)
    watchdog = IsolationWatchdog(database)
    assert await watchdog.check_once() == []
    async with database.engine.begin() as conn:
        await conn.execute(text("UPDATE deployments SET name = 'lab-api' WHERE name = 'lab-web'"))
    assert await watchdog.check_once() == []
    async with database.engine.begin() as conn:
        await conn.execute(text("UPDATE placements SET node_id = 'n2' WHERE deployment_id = "
                                "(SELECT id FROM deployments WHERE name = 'rival-web')"))
    alarms = await watchdog.check_once()
    assert [(a.violation.rule, a.violation.tenants) for a in alarms][:1] == [("ACCELERATOR", ("lab", "rival"))]


