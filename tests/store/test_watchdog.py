"""The isolation watchdog: a placement that breaks isolation, written into the database by hand,
raises an alarm (ERROR log, event, audit entry, counters) within seconds, once per violation."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from sqlalchemy import event, select, text

from controller.store import audit
from controller.store import models as m
from controller.store.db import Database
from controller import watchdog as watchdog_module
from controller.domain.changes import ClusterChange
from controller.store.changes import bump_cluster_generation
from controller.watchdog import CLEARED_KIND, EVENT_KIND, IsolationWatchdog

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
    assert "placement rule ISOLATION violated at node n1" in caplog.text
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
    # A hand INSERT is a change no writer logged: it needs a full check, which `max_share` defers
    # by 20x the last one's cost at the default (0.05). A slow host's first check (0.5 s) would
    # put the alarm past the wait below; the deferral has its own test.
    watchdog = IsolationWatchdog(database, interval_s=0.1, max_share=1.0)
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




# Change checks: what a controller writer changes (and logs, `store.changes`) is read and judged alone.

async def _written_and_logged(database: Database, change: ClusterChange, *statements: str) -> None:
    """`statements` and the change log's entry for them, in one transaction: as a controller writer does."""
    async with database.unit_of_work() as uow:
        for statement in statements:
            await uow.session.execute(text(statement))
        await bump_cluster_generation(uow.session, change)
        await uow.commit()


def _insert(deployment: str, replica: int, node: str, indices: str) -> str:
    return ("INSERT INTO placements (deployment_id, replica, shard, node_id, accelerator_indices, phase, message, "
            f"generation, updated_at) SELECT id, {replica}, 0, '{node}', '{indices}', 'running', '', 0, "
            f"CURRENT_TIMESTAMP FROM deployments WHERE name = '{deployment}'")


def _keys(violations: list[Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [v.key for v in violations]


# Eight nodes, two racks, no rule of a rack's scope (no tenant dedicated_rack or excluding
# another): a change check judges the nodes it touches alone. Tenant "solo" is dedicated_node.
WIDE: dict[str, Any] = {
    **TWO_RACKS,
    "nodes": [{"id": f"n{i}", "rack": "rack1" if i <= 4 else "rack2", "accelerators": 4} for i in range(1, 9)],
    "tenants": [{"id": "solo", "isolation": "dedicated_node"}, {"id": "lab"}],
    "deployments": [{"id": f"{t}-web", "tenant": t, "replicas": 8, "shards_per_replica": 1, "shard": {"accelerators": 1}}
                    for t in ("solo", "lab")],
    "placements": [{"deployment": "solo-web", "replica": 0, "shard": 0, "node": "n1", "accelerator_indices": [0]}]
    + [{"deployment": "lab-web", "replica": r, "shard": 0, "node": f"n{r + 2}", "accelerator_indices": [0]}
       for r in range(6)],
}


async def test_a_change_check_reads_and_judges_only_what_the_log_names(database: Database) -> None:
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, WIDE)
        await uow.commit()
    now = [0.0]
    watchdog = IsolationWatchdog(database, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == []
    assert (watchdog.full_checks_total, watchdog.placements_judged_total) == (1, 7)
    rows, judged = watchdog.rows_read_total, watchdog.placements_judged_total

    now[0] = 2.0  # lab's replica 6 placed on n1, beside the dedicated_node tenant solo, by a writer that logs it
    await _written_and_logged(database, ClusterChange.placements(["lab/lab-web"]), _insert("lab-web", 6, "n1", "[1]"))
    alarms = await watchdog.check_if_changed()
    assert [(a.violation.rule, a.violation.scope, a.violation.tenants) for a in alarms] == [
        ("ISOLATION", "node n1", ("lab", "solo"))]
    assert (watchdog.checks_total, watchdog.full_checks_total) == (2, 1)
    # lab/lab-web and its 7 placements (then, to confirm the alarm, n1, its 2 placements and their
    # 2 deployments: as the view held them, so not judged again), not the 17 rows of the cluster;
    # judged: n1's 2 placements
    assert watchdog.rows_read_total - rows == 1 + 7 + 1 + 2 + 2
    assert watchdog.placements_judged_total - judged == 2

    now[0] = 4.0  # moved away by the next logged change: cleared, without a full check
    await _written_and_logged(database, ClusterChange.placements(["lab/lab-web"]),
                              "UPDATE placements SET node_id = 'n8' WHERE replica = 6")
    assert await watchdog.check_if_changed() == []
    assert (watchdog.active_violations, watchdog.full_checks_total) == (0, 1)


async def test_a_change_check_raises_no_false_alarm_for_a_row_the_log_did_not_name(database: Database) -> None:
    # lab's shard on n2[0] deleted by hand (nothing logged), then rival placed on n2[0] by a writer
    # that logs it: the view still holds lab's shard there, and judged alone it would see two
    # tenants on one accelerator. The alarm's node is read again first, and nothing is raised.
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == []
    now[0] = 2.0
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM placements WHERE node_id = 'n2'"))
    await _written_and_logged(database, ClusterChange.placements(["rival/rival-web"]),
                              _insert("rival-web", 1, "n2", "[0]"))
    assert await watchdog.check_if_changed() == []
    assert (watchdog.full_checks_total, watchdog.active_violations, watchdog.alarms_total) == (1, 0, 0)
    assert watchdog.violations == await IsolationWatchdog(database).check_once() == []


async def test_under_churn_a_hand_written_violation_is_found_by_the_periodic_full_check(database: Database) -> None:
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, full_every_s=60, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == []
    now[0] = 10.0  # a hand edit, while a writer logs a change of its own: the log does not name it
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    await _written_and_logged(database, ClusterChange.placements(["rival/rival-web"]),
                              "UPDATE placements SET accelerator_indices = '[1]' WHERE node_id = 'n3'")
    assert await watchdog.check_if_changed() == []
    assert (watchdog.checks_total, watchdog.full_checks_total) == (2, 1)
    now[0] = 61.0  # churn goes on; the full check is due and reads every row
    await _written_and_logged(database, ClusterChange.placements(["rival/rival-web"]),
                              "UPDATE placements SET accelerator_indices = '[2]' WHERE node_id = 'n3'")
    alarms = await watchdog.check_if_changed()
    assert [(a.violation.rule, a.violation.scope) for a in alarms] == [("ISOLATION", "node n1")]
    assert watchdog.full_checks_total == 2


async def test_change_checks_find_what_a_full_check_finds(database: Database) -> None:
    """Logged changes of every kind the watchdog reads (placements written, moved and removed,
    a deployment deleted, a node removed, a tenant's contract changed): after each, the change
    check's violations are those of a full check of the database by a new watchdog."""
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, clock=lambda: now[0])
    await watchdog.check_if_changed()
    steps: list[tuple[ClusterChange, tuple[str, ...]]] = [
        (ClusterChange.placements(["lab/lab-web"]), (_insert("lab-web", 1, "n1", "[1]"),)),  # ISOLATION n1
        (ClusterChange.placements(["rival/rival-web"]),  # ACCELERATOR n2[0], and off n3
         ("UPDATE placements SET node_id = 'n2' WHERE node_id = 'n3'",)),
        (ClusterChange.placements(["eu/eu-web"]), (_insert("eu-web", 0, "n4", "[0]"),)),  # rack2
        (ClusterChange.tenant("eu"), ("UPDATE tenants SET isolation = 'dedicated_rack' WHERE id = 'eu'",)),
        (ClusterChange.placements(["rival/rival-web"]), (_insert("rival-web", 1, "n4", "[1]"),)),  # ISOLATION rack2
        (ClusterChange.tenant("lab"), ("UPDATE tenants SET excludes = '[]' WHERE id = 'lab'",)),  # EXCLUSION gone
        (ClusterChange.deployment_deleted("lab/lab-web"),
         ("DELETE FROM placements WHERE deployment_id = (SELECT id FROM deployments WHERE name = 'lab-web')",
          "DELETE FROM deployments WHERE name = 'lab-web'")),
        (ClusterChange.node("n4"), ("DELETE FROM placements WHERE node_id = 'n4'", "DELETE FROM nodes WHERE id = 'n4'")),
        (ClusterChange.placements(["solo/solo-web"]), (_insert("solo-web", 1, "n2", "[3]"),)),  # ISOLATION n2
    ]
    seen = set()
    for step, (change, statements) in enumerate(steps, start=1):
        now[0] = 2.0 * step
        await _written_and_logged(database, change, *statements)
        await watchdog.check_if_changed()
        fresh = IsolationWatchdog(database)
        await fresh.check_once()
        expected = _keys(fresh.violations)
        assert _keys(watchdog.violations) == expected, f"after step {step}"
        seen.update(expected)
    assert watchdog.full_checks_total == 1
    assert {rule for rule, _, _ in seen} == {"ISOLATION", "ACCELERATOR", "EXCLUSION"}


async def test_a_full_check_that_fails_half_way_is_followed_by_another(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == []
    real_pages = watchdog_module.pages

    async def failing_pages(session: Any, columns: Any) -> Any:  # the nodes read, then the database fails
        async for page in real_pages(session, columns):
            yield page
        if columns is watchdog_module.DEPLOYMENT_COLUMNS:
            raise ConnectionError("database went away")

    monkeypatch.setattr(watchdog_module, "pages", failing_pages)
    with pytest.raises(ConnectionError):
        await watchdog.check_once()
    monkeypatch.undo()
    now[0] = 2.0  # the next round reads everything again, though nothing was logged since
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    await _written_and_logged(database, ClusterChange.placements(["rival/rival-web"]),
                              "UPDATE placements SET accelerator_indices = '[1]' WHERE node_id = 'n3'")
    alarms = await watchdog.check_if_changed()
    assert [a.violation.rule for a in alarms] == ["ISOLATION"] and watchdog.full_checks_total == 2


async def test_an_alarm_whose_records_failed_to_commit_is_stored_by_a_later_round(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The event and audit entry are written after the violation is marked active: a failed write
    # (a busy database, a failover) must not leave the alarm raised in the log and never stored.
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == []
    real_append = audit.append

    async def failing_append(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("database went away")

    monkeypatch.setattr(audit, "append", failing_append)
    now[0] = 2.0
    await _written_and_logged(database, ClusterChange.placements(["lab/lab-web"]), _insert("lab-web", 1, "n1", "[1]"))
    with pytest.raises(ConnectionError):
        await watchdog.check_if_changed()
    monkeypatch.setattr(audit, "append", real_append)
    now[0] = 4.0  # nothing changed since: the round is otherwise skipped
    await watchdog.check_if_changed()
    async with database.unit_of_work() as uow:
        events = (await uow.session.execute(select(m.Event).where(m.Event.kind == EVENT_KIND))).scalars().all()
        assert [(e.object_kind, e.object_id) for e in events] == [("node", "n1")]
        assert [(e.action, e.tenant) for e in await audit.list_entries(uow.session)] == [
            (EVENT_KIND, "lab"), (EVENT_KIND, "solo")]
    assert watchdog.alarms_total == 1
    await watchdog.check_if_changed()  # stored once
    async with database.unit_of_work() as uow:
        assert len((await uow.session.execute(select(m.Event).where(m.Event.kind == EVENT_KIND))).scalars().all()) == 1


async def test_a_full_check_deferred_for_an_unlogged_change_is_not_forgotten_by_a_change_check(
        database: Database) -> None:
    # A hand edit moves the isolation version and not the generation: a full check is owed, and
    # deferred for its cost. A logged change that comes next must not pay that debt with a change
    # check of its own objects (the hand edit would wait for the periodic full check).
    await _seeded(database)
    now = [0.0]
    watchdog = IsolationWatchdog(database, full_every_s=60, max_share=0.05, clock=lambda: now[0])
    assert await watchdog.check_if_changed() == []
    watchdog.last_full_ms = 1000.0  # as if that check had taken a second: the next full check waits 20 s
    now[0] = 2.0
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    assert await watchdog.check_if_changed() is None and watchdog.deferred_total == 1
    now[0] = 4.0
    await _written_and_logged(database, ClusterChange.placements(["rival/rival-web"]),
                              "UPDATE placements SET accelerator_indices = '[1]' WHERE node_id = 'n3'")
    assert await watchdog.check_if_changed() == []  # what was logged is checked; the full check stays owed
    assert (watchdog.checks_total, watchdog.full_checks_total) == (2, 1)
    now[0] = 21.0
    alarms = await watchdog.check_if_changed()
    assert alarms is not None and [(a.violation.rule, a.violation.scope) for a in alarms] == [("ISOLATION", "node n1")]
    assert watchdog.full_checks_total == 2


async def _stored(database: Database) -> list[tuple[str, str]]:
    async with database.unit_of_work() as uow:
        return [(e.kind, e.object_id) for e in (await uow.session.execute(
            select(m.Event).where(m.Event.kind.in_((EVENT_KIND, CLEARED_KIND))).order_by(m.Event.id))).scalars()]


async def test_a_new_leader_does_not_alarm_again_what_the_old_one_alarmed(database: Database) -> None:
    await _seeded(database)
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    old = IsolationWatchdog(database)
    assert len(await old.check_once()) == 1
    new = IsolationWatchdog(database)  # another controller, leading after a failover
    assert await new.check_once() == [] and new.active_violations == 1 and new.alarms_total == 0
    assert await _stored(database) == [(EVENT_KIND, "n1")]
    # Cleared under the new leader, and back: alarmed again (its clearing is stored).
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM placements WHERE replica = 1"))
    assert await new.check_once() == []
    assert await _stored(database) == [(EVENT_KIND, "n1"), (CLEARED_KIND, "n1")]
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    assert len(await IsolationWatchdog(database).check_once()) == 1  # a third leader: alarmed, cleared since


async def test_a_leader_again_stores_the_clearing_of_an_alarm_it_no_longer_finds(database: Database) -> None:
    # Alarmed by an old leader that died before it saw the violation clear: the next leader finds
    # it gone and stores its clearing, so that when it comes back it alarms again.
    await _seeded(database)
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    assert len(await IsolationWatchdog(database).check_once()) == 1
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM placements WHERE replica = 1"))
    leading = [True]
    watchdog = IsolationWatchdog(database, should_run=lambda: leading[0])
    assert watchdog.leads()
    assert await watchdog.check_if_changed() == []
    assert await _stored(database) == [(EVENT_KIND, "n1"), (CLEARED_KIND, "n1")]
    leading[0] = False
    assert not watchdog.leads()
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    assert len(await IsolationWatchdog(database).check_once()) == 1  # alarmed by the leader of the moment
    leading[0] = True
    assert watchdog.leads()  # leading again: what it saw before is forgotten, the records read
    assert await watchdog.check_if_changed() == []
    assert await _stored(database) == [(EVENT_KIND, "n1"), (CLEARED_KIND, "n1"), (EVENT_KIND, "n1")]


async def test_records_left_unstored_by_a_lost_leadership_do_not_outlive_what_the_next_leader_stored(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # A leader whose alarm's write failed (the database went away, and its lease with it) keeps the
    # record. Stored when it leads again, after the next leader alarmed and cleared the violation,
    # it would be the violation's last record: the violation, back meanwhile, would be taken as
    # alarmed and never alarmed.
    await _seeded(database)
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    leading = [True]
    old = IsolationWatchdog(database, should_run=lambda: leading[0])
    real_append = audit.append

    async def failing_append(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("database went away")

    monkeypatch.setattr(audit, "append", failing_append)
    assert old.leads()
    with pytest.raises(ConnectionError):
        await old.check_if_changed()
    monkeypatch.setattr(audit, "append", real_append)
    leading[0] = False
    assert not old.leads()
    new = IsolationWatchdog(database)  # the next leader: alarms (nothing stored), sees it clear
    assert len(await new.check_once()) == 1
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM placements WHERE replica = 1"))
    assert await new.check_once() == []
    await _place_by_hand(database, "lab-web", "n1", "[1]")  # back, before the next round
    leading[0] = True
    assert old.leads()  # leading again
    alarms = await old.check_if_changed()
    assert alarms is not None and [(a.violation.rule, a.violation.scope) for a in alarms] == [("ISOLATION", "node n1")]


async def test_a_new_leader_reads_the_stored_records_through_their_index(database: Database) -> None:
    # `events` is never pruned: the read once per leadership goes through the partial index of the
    # two kinds (migration 0021), not a scan of every event.
    executed: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "FROM events" in statement:
            executed.append((statement, parameters))

    event.listen(database.engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with database.unit_of_work() as uow:
            assert await watchdog_module._stored_alarms(uow.session) == {}
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", capture)
    [(statement, parameters)] = executed
    async with database.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            explain = "EXPLAIN QUERY PLAN"
        else:
            explain = "EXPLAIN"
            await conn.exec_driver_sql("SET enable_seqscan = off")  # an empty table is scanned otherwise
        plan = " ".join(str(row[-1]) for row in await conn.exec_driver_sql(f"{explain} {statement}", parameters))
    assert "ix_events_isolation" in plan, plan


async def test_a_watchdog_that_stops_leading_says_nothing_stands(database: Database) -> None:
    """`active_violations` is exported as maia_isolation_watchdog_violations, read by the alert
    rule with max() over the controllers: a follower's count of what it saw as leader would keep
    the alert firing after the leader found the violation cleared."""
    await _seeded(database)
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    leading = [True]
    watchdog = IsolationWatchdog(database, should_run=lambda: leading[0])
    assert watchdog.leads() and len(await watchdog.check_if_changed() or []) == 1
    assert watchdog.active_violations == 1
    leading[0] = False
    assert not watchdog.leads() and watchdog.active_violations == 0


async def test_a_rollouts_outgoing_shards_are_judged_by_the_spec_they_were_placed_with(database: Database) -> None:
    """Half-accelerator shards sharing an accelerator, their deployment updated to whole
    accelerators (not placed yet): the old replicas are fractions still, not a whole-accelerator
    shard shared (a false alarm found by exploratory testing, cleared when the rollout ended)."""
    half = {"id": "lab-half", "tenant": "lab", "replicas": 2, "shards_per_replica": 1,
            "shard": {"accelerators": 1, "accelerator_milli": 500}}
    await _seeded(database)
    async with database.unit_of_work() as uow:
        await seed_problem(uow.session, {"zones": [], "rows": [], "racks": [], "nodes": [], "tenants": [],
                                         "deployments": [half], "placements": [
            {"deployment": "lab-half", "replica": r, "shard": 0, "node": "n2", "accelerator_indices": [1],
             "accelerator_milli": 500} for r in (0, 1)]})
        await uow.commit()
    watchdog = IsolationWatchdog(database)
    assert await watchdog.check_once() == []
    async with database.engine.begin() as conn:  # updated to revision 2: whole accelerators
        await conn.execute(text("UPDATE deployments SET shard_accelerator_milli = 1000, template_revision = 2, "
                                "revision_specs = :specs WHERE name = 'lab-half'"),
                           {"specs": json.dumps({"1": half})})
    assert await watchdog.check_once() == []
    assert await IsolationWatchdog(database).check_once() == []  # a full check finds nothing either
    async with database.engine.begin() as conn:  # a shard of revision 2 shares it: that is a violation
        await conn.execute(text("UPDATE placements SET revision = 2 WHERE replica = 1 AND deployment_id = "
                                "(SELECT id FROM deployments WHERE name = 'lab-half')"))
    assert [a.violation.rule for a in await IsolationWatchdog(database).check_once()] == ["ACCELERATOR"]


async def test_a_lead_lost_and_regained_between_two_rounds_alarms_a_violation_that_came_back(
        database: Database) -> None:
    """Its lead lost and regained between two of its rounds, the watchdog never saw itself
    follow: it took its last term's alarm as standing, though another leader had cleared it
    since, and the violation come back was never alarmed. A new term (`lead`) forgets it."""
    await _seeded(database)
    await _place_by_hand(database, "lab-web", "n1", "[1]")
    leading = [True]
    a = IsolationWatchdog(database, should_run=lambda: leading[0])
    assert a.leads() and len(await a.check_if_changed() or []) == 1
    leading[0] = False  # lost, between two of its rounds
    b = IsolationWatchdog(database)  # the next leader: the alarm stands, then it clears
    assert await b.check_once() == []
    async with database.engine.begin() as conn:
        await conn.execute(text("DELETE FROM placements WHERE replica = 1"))
    assert await b.check_once() == []
    await _place_by_hand(database, "lab-web", "n1", "[1]")  # back
    leading[0] = True
    a.lead()  # elected again
    assert a.leads() and len(await a.check_if_changed() or []) == 1
    assert await _stored(database) == [(EVENT_KIND, "n1"), (CLEARED_KIND, "n1"), (EVENT_KIND, "n1")]
