"""A scrape's usage counters and the console's usage totals read no metering history, and a usage
read that fails or is slow leaves the other gauges in the scrape.

Every scrape and every console build summed all of `usage_intervals` (nothing deletes them): at
3 million intervals a scrape took 5-10 s, hit its timeout, and the nodes, deployments and power
gauges went with the usage (they were one read). Now usage to date is the closed intervals'
sums the triggers keep plus the open intervals (found by the ended_s index), read beside the
cluster's gauges with a timeout and an error counter of its own.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, insert, select, text, update

from controller.console.state import read_console_rows
from controller.observability import cluster as cluster_read
from controller.observability import metrics as metrics_module
from controller.observability.metrics import ControllerMetrics
from controller.reconcile import Reconciler
from controller.store import metering
from controller.store import models as m
from controller.store.db import Database
from controller.usecases import deployments
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO, add_tenant, deployment, no_publish, submit

NOW = datetime.now(timezone.utc) + timedelta(hours=1)
GROUPS = ("tenant", "accelerator_model", "zone")


async def _metered_history(db: Database) -> None:
    """Two tenants' deployments placed (their intervals open), one deleted (closed), and a history
    of closed intervals written directly, as weeks of churn leave them."""
    await add_tenant(db, "t2")
    loop = Reconciler(db, push=lambda nodes: None, publish=no_publish)
    await submit(db, deployment("svc", "t1", accelerators=2, shard_power_w=400.0))
    await submit(db, deployment("chat", "t2", accelerators=1, shard_power_w=300.0))
    await submit(db, deployment("batch", "t2", accelerators=1))
    assert (await loop.reconcile_once()).solved
    async with db.unit_of_work() as uow:
        await deployments.delete_deployment(uow, WHO, "batch", RecordingSignals(), tenant="t2")
    await loop.reconcile_once()
    rng = random.Random(3)
    start = time.time() - 30 * 86_400
    async with db.unit_of_work() as uow:
        # The tenants are older than their history (a tenant's viewer reads from its creation on).
        for tenant in await uow.session.scalars(select(m.Tenant)):
            tenant.created_at = datetime.fromtimestamp(start - 86_400, timezone.utc)
        await uow.session.execute(insert(m.UsageInterval.__table__), [
            {"placement_id": 10_000 + i, "tenant_id": rng.choice(("t1", "t2")), "deployment": f"old{i % 40}",
             "replica": 0, "shard": 0, "node_id": "gone", "zone_id": "z1", "accelerator_model": "maia-100",
             "accelerator_milli": rng.choice((250, 1000)), "load_power_w": 200.0, "idle_share_w": 50.0,
             "started_s": start + 600 * i, "ended_s": start + 600 * i + rng.randint(1, 599)}
            for i in range(2_000)])
        await uow.commit()
    async with db.engine.begin() as conn:
        await conn.execute(text("ANALYZE"))


class _Statements:
    """The SQL statements (and their parameters) the database runs while recording."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.seen: list[tuple[str, object]] = []

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        self.seen.append((statement, parameters))

    async def run(self, read: Callable[[], Awaitable[object]]) -> list[tuple[str, object]]:
        self.seen = []
        event.listen(self._db.engine.sync_engine, "before_cursor_execute", self._record)
        try:
            await read()
        finally:
            event.remove(self._db.engine.sync_engine, "before_cursor_execute", self._record)
        return [(sql, params) for sql, params in self.seen if "usage_intervals" in sql]


async def _plan(db: Database, sql: str, params: object) -> str:
    """The database's plan of one statement, as text; on PostgreSQL with sequential scans off,
    so that the plan says whether an index can serve it (a tiny table is scanned anyway)."""
    async with db.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql("SET enable_seqscan = off")
            rows = await conn.exec_driver_sql(f"EXPLAIN {sql}", params)
            return "\n".join(row[0] for row in rows)
        rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)
        return "\n".join(row[-1] for row in rows)


async def _assert_reads_only_open_intervals(db: Database, reads: list[tuple[str, object]]) -> None:
    assert len(reads) == 1, reads  # one statement: the sums, the deltas and the open intervals
    sql, params = reads[0]
    assert re.search(r"usage_intervals\.ended_s IS NULL", sql), sql
    plan = await _plan(db, sql, params)
    # Each scan of the table (PostgreSQL: "... Scan ... on usage_intervals"; SQLite: "SCAN|SEARCH usage_intervals").
    scans = [line for line in plan.splitlines() if re.search(r"(Scan.* on |SCAN |SEARCH )usage_intervals\b", line)]
    assert scans and all("ix_usage_intervals_ended_s" in line for line in scans), plan
    assert "ended_s IS NULL" in plan or "ended_s=?" in plan, plan


async def _by_tenant_history(db: Database, tenant: str = "") -> dict[str, tuple[float, float]]:
    async with db.unit_of_work() as uow:
        return {t.tenant: pytest.approx((t.accelerator_seconds, t.energy_j))
                for t in await metering.usage_by(uow.session, ("tenant",), now=NOW, tenant=tenant)}


async def test_a_scrape_reads_the_open_intervals_only(cluster: Database) -> None:
    await _metered_history(cluster)
    recorder = _Statements(cluster)
    counters: dict = {}

    async def usage() -> None:
        async with cluster.unit_of_work() as uow:
            counters.update(await cluster_read.read_usage_counters(uow.session, now=NOW))

    async def gauges() -> None:
        async with cluster.unit_of_work() as uow:
            await cluster_read.read_cluster_gauges(uow.session, now=NOW)

    await _assert_reads_only_open_intervals(cluster, await recorder.run(usage))
    assert await recorder.run(gauges) == []  # the gauges' read leaves the meter alone
    async with cluster.unit_of_work() as uow:
        whole = await metering.usage_by(uow.session, GROUPS, now=NOW)
    assert counters == {(t.tenant, t.accelerator_model, t.zone): pytest.approx((t.accelerator_seconds, t.energy_j))
                        for t in whole}
    assert set(counters) == {("t1", "maia-100", "z1"), ("t2", "maia-100", "z1")}


async def test_a_console_build_reads_the_open_intervals_only(cluster: Database) -> None:
    await _metered_history(cluster)
    recorder = _Statements(cluster)
    for viewer, legacy in (("", False), ("t2", False), ("t2", True)):
        read: list = []
        if legacy:  # a tenant created before migration 0030: no usage of its id's before it stored
            async with cluster.unit_of_work() as uow:
                await uow.session.execute(update(m.Tenant).where(m.Tenant.id == "t2").values(
                    usage_before_accelerator_s=None, usage_before_energy_j=None))
                await uow.commit()

        async def console() -> None:
            async with cluster.unit_of_work() as uow:
                read.append(await read_console_rows(uow.session, viewer_tenant=viewer, now=NOW))

        reads = await recorder.run(console)
        if legacy:
            # What its id's customers before its creation used, read by the tenant's started_s
            # index up to its creation (none here, as for any id never reused).
            sql, params = reads.pop()
            plan = await _plan(cluster, sql, params)
            scans = [line for line in plan.splitlines() if re.search(r"(Scan.* on |SCAN |SEARCH )usage_intervals\b", line)]
            assert scans and all("ix_usage_intervals_tenant_started" in line for line in scans), plan
        await _assert_reads_only_open_intervals(cluster, reads)
        assert {t.tenant: (t.accelerator_seconds, t.energy_j) for t in read[0].usage} == \
            await _by_tenant_history(cluster, viewer)


def _scraped(metrics: ControllerMetrics) -> dict[str, float]:
    """Every sample of one scrape by name and labels, as `name{k=v,...}`."""
    text_ = generate_latest(metrics.registry).decode()
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text_) for s in family.samples}


def _watching(db: Database, usage: Callable[[], Awaitable[cluster_read.UsageCounters]]) -> ControllerMetrics:
    metrics = ControllerMetrics()

    async def gauges() -> cluster_read.ClusterGauges:
        async with db.unit_of_work() as uow:
            return await cluster_read.read_cluster_gauges(uow.session)

    metrics.watch_cluster(asyncio.get_running_loop(), gauges, usage)
    return metrics


async def test_a_failing_usage_read_leaves_the_other_gauges(cluster: Database) -> None:
    await _metered_history(cluster)

    async def broken() -> cluster_read.UsageCounters:
        raise RuntimeError("usage read failed")

    metrics = _watching(cluster, broken)
    samples = await asyncio.to_thread(_scraped, metrics)
    assert samples["maia_nodes{state=ready}"] == 4
    assert samples["maia_deployments{phase=scheduled}"] + samples["maia_deployments{phase=running}"] == 2
    assert any(name.startswith("maia_rack_power_used_watts") for name in samples)
    assert not any(name.startswith("maia_usage_") for name in samples)
    assert samples["maia_metrics_usage_read_errors_total{}"] == 1
    assert samples["maia_metrics_cluster_read_errors_total{}"] == 0


async def test_a_slow_usage_read_times_out_alone(cluster: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await _metered_history(cluster)
    monkeypatch.setattr(metrics_module, "USAGE_READ_TIMEOUT_S", 0.3)

    async def slow() -> cluster_read.UsageCounters:
        await asyncio.sleep(30)
        return {}

    metrics = _watching(cluster, slow)
    started = time.monotonic()
    samples = await asyncio.to_thread(_scraped, metrics)
    assert time.monotonic() - started < 4  # not the cluster read's 5 s timeout, nor the usage read's 30
    assert samples["maia_nodes{state=ready}"] == 4
    assert not any(name.startswith("maia_usage_") for name in samples)
    assert samples["maia_metrics_usage_read_errors_total{}"] == 1

    async def usage() -> cluster_read.UsageCounters:  # and a scrape whose reads both work has both
        async with cluster.unit_of_work() as uow:
            return await cluster_read.read_usage_counters(uow.session)

    metrics = _watching(cluster, usage)
    samples = await asyncio.to_thread(_scraped, metrics)
    assert samples["maia_nodes{state=ready}"] == 4
    assert samples["maia_usage_accelerator_seconds_total{model=maia-100,tenant=t1,zone=z1}"] > 0
    assert samples["maia_metrics_usage_read_errors_total{}"] == 0


async def test_a_failed_cluster_read_is_answered_with_the_last_one_for_a_minute(
        cluster: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """One slow database read used to drop every cluster gauge from the scrape: the series the
    alert rules read went stale, resolving what fired and restarting every `for:` clock."""
    await _metered_history(cluster)
    failing = [False]
    metrics = ControllerMetrics()

    async def gauges() -> cluster_read.ClusterGauges:
        if failing[0]:
            raise asyncio.TimeoutError("slow database")
        async with cluster.unit_of_work() as uow:
            return await cluster_read.read_cluster_gauges(uow.session)

    metrics.watch_cluster(asyncio.get_running_loop(), gauges, None)
    assert (await asyncio.to_thread(_scraped, metrics))["maia_nodes{state=ready}"] == 4
    failing[0] = True
    samples = await asyncio.to_thread(_scraped, metrics)
    assert samples["maia_nodes{state=ready}"] == 4 and samples["maia_metrics_cluster_read_errors_total{}"] == 1
    monkeypatch.setattr(metrics_module, "LAST_READ_KEPT_S", 0.0)  # older than kept: dropped
    samples = await asyncio.to_thread(_scraped, metrics)
    assert "maia_nodes{state=ready}" not in samples and samples["maia_metrics_cluster_read_errors_total{}"] == 2


async def test_a_usage_counter_that_reads_lower_than_it_showed_is_shown_as_it_was(cluster: Database) -> None:
    """A read may be lower than the one before (an interval counted open to the first read's
    clock, then closed at a time stamped before its commit): `/metrics` shows the most it showed,
    as a counter must; a series the reads no longer have goes, and a new one starts as read."""
    key = ("t1", "maia-100", "z1")
    reads = iter([{key: (100.5, 2000.0)}, {key: (100.0, 2100.0)},
                  {key: (101.0, 1900.0), ("t2", "maia-100", "z1"): (5.0, 50.0)},
                  {("t2", "maia-100", "z1"): (4.0, 60.0)}, {key: (3.0, 30.0)}])

    async def going_back() -> cluster_read.UsageCounters:
        return next(reads)

    metrics = _watching(cluster, going_back)
    shown = []
    for _ in range(3):
        samples = await asyncio.to_thread(_scraped, metrics)
        shown.append((samples["maia_usage_accelerator_seconds_total{model=maia-100,tenant=t1,zone=z1}"],
                      samples["maia_usage_energy_joules_total{model=maia-100,tenant=t1,zone=z1}"]))
    assert shown == [(100.5, 2000.0), (100.5, 2100.0), (101.0, 2100.0)]
    samples = await asyncio.to_thread(_scraped, metrics)  # t1 no longer read: its series goes
    assert not any("tenant=t1" in name for name in samples)
    assert samples["maia_usage_accelerator_seconds_total{model=maia-100,tenant=t2,zone=z1}"] == 5.0
    samples = await asyncio.to_thread(_scraped, metrics)  # back again: a new series, as read
    assert samples["maia_usage_accelerator_seconds_total{model=maia-100,tenant=t1,zone=z1}"] == 3.0


async def test_scrapes_that_come_while_one_reads_share_its_read(cluster: Database) -> None:
    """Each scrape ran its own reads of the whole cluster on the event loop, and the port asks no
    token: 32 scrapes at once were 32 reads (found in review). Those that come while one reads
    share it; one that comes after reads again."""
    reads = [0]
    held = asyncio.Event()

    async def gauges() -> cluster_read.ClusterGauges:
        reads[0] += 1
        await held.wait()  # a read under way while the others come
        async with cluster.unit_of_work() as uow:
            return await cluster_read.read_cluster_gauges(uow.session)

    metrics = ControllerMetrics()
    metrics.watch_cluster(asyncio.get_running_loop(), gauges, None)
    first = asyncio.create_task(asyncio.to_thread(metrics.read_cluster))
    while not reads[0]:
        await asyncio.sleep(0.01)
    others = [asyncio.create_task(asyncio.to_thread(metrics.read_cluster)) for _ in range(4)]
    await asyncio.sleep(1.0)  # they come (threads of the default executor: 6 on 2 cores)
    held.set()
    together = await asyncio.gather(first, *others)
    assert reads[0] == 1 and all(g is not None for g, _ in together)
    held.set()
    await asyncio.to_thread(metrics.read_cluster)  # after: a read of its own
    assert reads[0] == 2
