"""Usage metering through simulated time: placements start and stop at the reconciler's
injected clock; the report's accelerator-hours and kWh equal hand-computed values.

The cluster (tests/controller/conftest.py): 4 nodes of 4 maia-100 accelerators, 500 W idle
each, in zone z1. An accelerator's share of its node's idle power is 500 / 4 = 125 W.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, select

from controller.errors import InvalidArgument, NotFound, PermissionDenied
from controller.identity import Principal, Role
from controller.reconcile import Reconciler
from controller.store import models as m
from controller.store import repositories as repo
from controller.store.db import Database
from controller.store.rollout import retire_replaced
from controller.console.state import read_console_rows
from controller.store import audit as audit_store
from controller.store.audit import AuditRecord
from controller.usecases import audit as audit_cases
from controller.usecases import deployments, nodes, tenants
from controller.usecases import events as event_cases
from controller.usecases.ports import RecordingSignals
from controller.usecases.usage import usage_report
from uc_builders import WHO, add_tenant, deployment, no_publish, submit

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=timezone.utc)
H = timedelta(hours=1)


class WallClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def reconciler(db: Database, clock: WallClock) -> Reconciler:
    return Reconciler(db, push=lambda nodes: None, publish=no_publish, solve_time_limit_ms=2000, wall_clock=clock)


async def _run(db: Database, clock: WallClock) -> None:
    """Two deployments placed at T0; `big` deleted at T0+2h; `frac` still running."""
    await add_tenant(db, "t2")
    loop = reconciler(db, clock)
    # t1: one replica of 2 shards x 2 whole accelerators, 400 W per loaded accelerator.
    await submit(db, deployment("big", "t1", shards=2, accelerators=2, shard_power_w=400.0))
    # t2: two replicas of one quarter accelerator, 800 W per whole loaded accelerator.
    await submit(db, deployment("frac", "t2", replicas=2, accelerators=1, shard_accelerator_milli=250,
                                shard_hbm_gib=8.0, shard_power_w=800.0))
    assert (await loop.reconcile_once()).solved
    clock.now = T0 + 2 * H
    async with db.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "big", RecordingSignals())
    assert "t1/big" in (await loop.reconcile_once()).deleted


def _by_deployment(report) -> dict[str, tuple[float, float]]:
    return {r.deployment: (r.accelerator_seconds / 3600, r.energy_kwh) for r in report.records}


async def test_accelerator_hours_and_kwh_match_hand_computed_values(cluster: Database) -> None:
    clock = WallClock()
    await _run(cluster, clock)
    async with cluster.unit_of_work() as uow:
        report = await usage_report(uow, WHO, now=T0 + 3 * H)
    # big, 2 h: 4 accelerators; 1600 W load + 4 x 125 W idle share = 2100 W -> 4.2 kWh.
    # frac, 3 h (still open): 2 x 0.25 accelerators; 2 x (200 W + 31.25 W) = 462.5 W -> 1.3875 kWh.
    assert _by_deployment(report) == {"big": pytest.approx((8.0, 4.2)), "frac": pytest.approx((1.5, 1.3875))}
    assert {(r.tenant, r.deployment, r.accelerator_model, r.zone) for r in report.records} == {
        ("t1", "big", "maia-100", "z1"), ("t2", "frac", "maia-100", "z1")}
    assert report.until == T0 + 3 * H


async def test_a_window_clips_the_intervals(cluster: Database) -> None:
    clock = WallClock()
    await _run(cluster, clock)
    async with cluster.unit_of_work() as uow:
        report = await usage_report(uow, WHO, since=T0 + H, until=T0 + 2.5 * H, now=T0 + 3 * H)
        # An `until` in the future stops at now.
        future = await usage_report(uow, WHO, since=T0 + 2.5 * H, until=T0 + 10 * H, now=T0 + 3 * H)
    # big in [1h, 2h): 4 accelerator-hours, 2.1 kWh; frac in [1h, 2.5h): 0.75, 0.69375 kWh.
    assert _by_deployment(report) == {"big": pytest.approx((4.0, 2.1)), "frac": pytest.approx((0.75, 0.69375))}
    assert _by_deployment(future) == {"frac": pytest.approx((0.25, 0.23125))}
    assert future.until == T0 + 3 * H
    # A window wholly ahead of now was answered as an empty one "from 2030 to now": refused.
    async with cluster.unit_of_work() as uow:
        with pytest.raises(InvalidArgument, match=r"since \(2026-11-30T12:00:00\+00:00\) is not before now"):
            await usage_report(uow, WHO, since=T0 + 4 * H, until=T0 + 10 * H, now=T0 + 3 * H)


async def _created_at(db: Database, tenant: str, at: datetime) -> None:
    """The tenant's creation time on the simulated clock (created by the wall's, days later)."""
    async with db.unit_of_work() as uow:
        (await repo.get_tenant(uow.session, tenant)).created_at = at
        await uow.commit()


async def test_a_tenant_sees_only_its_own_usage(cluster: Database) -> None:
    clock = WallClock()
    await _run(cluster, clock)
    await _created_at(cluster, "t2", T0 - H)
    caller = Principal("lab-two-token", Role.TENANT, tenant="t2")
    async with cluster.unit_of_work() as uow:
        own = await usage_report(uow, caller, now=T0 + 3 * H)
        filtered = await usage_report(uow, WHO, tenant="t1", now=T0 + 3 * H)
        with pytest.raises(NotFound):
            await usage_report(uow, caller, tenant="t1", now=T0 + 3 * H)
        with pytest.raises(NotFound, match="tenant nobody not found"):
            await usage_report(uow, WHO, tenant="nobody", now=T0 + 3 * H)
        with pytest.raises(PermissionDenied):
            await usage_report(uow, Principal("n1-agent", Role.NODE, node="rack-a-n0"), now=T0 + 3 * H)
        with pytest.raises(InvalidArgument, match="must be before"):
            await usage_report(uow, WHO, since=T0 + H, until=T0, now=T0 + 3 * H)
    assert [r.deployment for r in own.records] == ["frac"]
    assert [r.deployment for r in filtered.records] == ["big"]


async def test_a_tenant_id_created_again_reads_only_the_new_customers_usage(cluster: Database) -> None:
    """t2 ran `frac` 3 h, was deleted and created again at 4 h; the new t2 runs a `frac` of its own
    from 4 h. Its token read the old customer's 1.5 accelerator-hours too, in the same row as its
    own (found by exploratory testing). It reads its own hour; an admin reads the whole history."""
    clock = WallClock()
    await _run(cluster, clock)
    loop = reconciler(cluster, clock)
    clock.now = T0 + 3 * H
    async with cluster.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "frac", RecordingSignals(), tenant="t2")
    assert "t2/frac" in (await loop.reconcile_once()).deleted
    async with cluster.unit_of_work() as uow:
        await tenants.delete_tenant(uow, WHO, "t2", RecordingSignals())
    async with cluster.unit_of_work() as uow:
        old_events = max(e.id for e in await uow.session.scalars(select(m.Event)))
        old_entries = max(e.seq for e in await uow.session.scalars(select(m.AuditEntry)))
    await add_tenant(cluster, "t2")
    await _created_at(cluster, "t2", T0 + 4 * H)
    clock.now = T0 + 4 * H
    await submit(cluster, deployment("frac", "t2", replicas=2, accelerators=1, shard_accelerator_milli=250,
                                     shard_hbm_gib=8.0, shard_power_w=800.0))
    assert (await loop.reconcile_once()).solved
    caller = Principal("new-lab-two-token", Role.TENANT, tenant="t2")
    async with cluster.unit_of_work() as uow:
        own = await usage_report(uow, caller, now=T0 + 5 * H)
        before = await usage_report(uow, caller, since=T0, until=T0 + 3 * H, now=T0 + 5 * H)
        history = await usage_report(uow, WHO, tenant="t2", now=T0 + 5 * H)
    assert _by_deployment(own) == {"frac": pytest.approx((0.5, 0.4625))} and own.since == T0 + 4 * H
    assert before.records == ()
    assert _by_deployment(history) == {"frac": pytest.approx((2.0, 1.85))}
    # The console's usage for its viewer read the old customer's too (2 accelerator-hours, not 0.5).
    async with cluster.unit_of_work() as uow:
        viewed = (await read_console_rows(uow.session, viewer_tenant="t2", now=T0 + 5 * H)).usage
        everyone = (await read_console_rows(uow.session, now=T0 + 5 * H)).usage
    assert [(t.tenant, t.accelerator_hours) for t in viewed] == [("t2", pytest.approx(0.5))]
    assert {t.tenant: t.accelerator_hours for t in everyone}["t2"] == pytest.approx(2.0)
    # History pruned as docs/operations.md says (closed intervals before a cut): the usage to date
    # keeps the old customer's hours, and the console showed them to the new one (exploratory
    # testing): what the id had used at the new customer's creation was read from those intervals.
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(delete(m.UsageInterval).where(
            m.UsageInterval.ended_s < (T0 + 4 * H).timestamp()))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        viewed = (await read_console_rows(uow.session, viewer_tenant="t2", now=T0 + 5 * H)).usage
        everyone = (await read_console_rows(uow.session, now=T0 + 5 * H)).usage
    assert [(t.tenant, t.accelerator_hours) for t in viewed] == [("t2", pytest.approx(0.5))]
    assert {t.tenant: t.accelerator_hours for t in everyone}["t2"] == pytest.approx(2.0)
    # Its events and audit entries: the new customer's alone (the old one's deployments, refusals
    # and contract changes were listed to it). The old customer's happened before the new t2 was
    # created (on the simulated clock: written by the wall's).
    async with cluster.unit_of_work() as uow:
        for event in await uow.session.scalars(select(m.Event).where(m.Event.id <= old_events)):
            event.at = T0 + 2 * H
        for entry in await uow.session.scalars(select(m.AuditEntry).where(m.AuditEntry.seq <= old_entries)):
            entry.at = T0 + 2 * H
        await audit_store.append(uow.session, [AuditRecord("old-token", "/maia.v1.X/Old", tenant="t2")], at=T0 + 2 * H)
        await audit_store.append(uow.session, [AuditRecord("new-token", "/maia.v1.X/New", tenant="t2")], at=T0 + 5 * H)
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        entries = await audit_cases.list_events(uow, caller)
        all_entries = await audit_cases.list_events(uow, WHO, tenant="t2")
        events = (await event_cases.list_events(uow, caller, object_kind="deployment", object_id="frac")).events
        all_events = (await event_cases.list_events(uow, WHO, object_kind="deployment", object_id="t2/frac")).events
    assert "/maia.v1.X/New" in [e.action for e in entries.items]
    assert all(e.seq > old_entries and e.action != "/maia.v1.X/Old" for e in entries.items)
    assert {"/maia.v1.X/Old", "/maia.v1.X/New"} <= {e.action for e in all_entries.items}
    assert any(e.seq <= old_entries for e in all_entries.items)
    assert events and all(e.id > old_events for e in events)
    assert len(all_events) > len(events) and any(e.id <= old_events for e in all_events)


async def test_the_meter_survives_a_restart_and_stops_with_a_drain(cluster: Database) -> None:
    clock = WallClock()
    await _run(cluster, clock)
    # A new controller process: a fresh engine on the same database, nothing kept in memory.
    restarted = Database(cluster.engine.url.render_as_string(hide_password=False))
    try:
        async with restarted.unit_of_work() as uow:
            report = await usage_report(uow, WHO, now=T0 + 3 * H)
            frac_nodes = set((await uow.session.execute(
                select(m.UsageInterval.node_id).where(m.UsageInterval.deployment == "frac"))).scalars())
        assert _by_deployment(report) == {"big": pytest.approx((8.0, 4.2)), "frac": pytest.approx((1.5, 1.3875))}
        # Draining a node stops the meters of the shards on it once they are stopped (these never
        # ran on an agent: nothing to wait for, the next retire pass stops them).
        async with restarted.unit_of_work() as uow:
            await nodes.drain_node(uow, WHO, sorted(frac_nodes)[0], RecordingSignals(), frozenset(), {})
        async with restarted.unit_of_work() as uow:
            assert (await retire_replaced(uow.session, now=T0 + 3 * H)).nodes == {sorted(frac_nodes)[0]}
            await uow.commit()
        async with restarted.unit_of_work() as uow:
            open_on = (await uow.session.execute(select(m.UsageInterval.node_id).where(
                m.UsageInterval.ended_s.is_(None)))).scalars().all()
        assert sorted(frac_nodes)[0] not in open_on
    finally:
        await restarted.dispose()


async def test_a_quarantined_deployments_meter_stops_with_its_shards(cluster: Database) -> None:
    """Quarantine released the shards but left their intervals open: the tenant was billed for
    accelerators it no longer held (and another tenant, placed there next, for the same ones)."""
    clock = WallClock()
    await _run(cluster, clock)  # frac (t2) running since T0
    async with cluster.unit_of_work() as uow:
        assert await repo.quarantine_deployment(uow.session, "t2/frac", "a stored row beyond today's limits",
                                                T0 + 2 * H)
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        report = await usage_report(uow, WHO, now=T0 + 5 * H)
        still_open = (await uow.session.execute(select(m.UsageInterval.deployment).where(
            m.UsageInterval.ended_s.is_(None)))).scalars().all()
    assert still_open == []
    assert _by_deployment(report)["frac"] == pytest.approx((2 * 0.5, 2 * 0.4625))  # 2 h, not 5
