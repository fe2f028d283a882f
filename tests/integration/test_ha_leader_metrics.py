"""A controller on PostgreSQL, in-process, whose database goes away: it steps down, and its
`/metrics` drops the leader's own series (the heartbeat lag) from the next scrape, keeping the
database's gauges as any follower's; when the database is back it leads again and the lag is back.

It answered failed reads with its last read, lag included, for up to a minute (`LAST_READ_KEPT_S`):
a stale leader's lag beside the new leader's for the same racks.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from controller.store.db import Database
from grpc_harness import eventually, heard_node, running_controller

pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])

LAG = "maia_node_heartbeat_lag_max_seconds"
# Steps down 1.5 s after its last renewal; the node stays up for the whole test without an agent.
FAST_LEASE = {"lease_ttl_s": 3.0, "lease_renew_s": 0.5, "reconcile_interval_s": 30.0,
              "heartbeat_timeout_s": 120.0, "metrics_listen": "127.0.0.1:0"}
Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _scrape_now(address: str) -> Series:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=15) as reply:
        exposition = reply.read().decode()
    series: Series = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return series


async def _scrape(address: str) -> Series:
    return await asyncio.to_thread(_scrape_now, address)  # the endpoint asks this loop for its read


@asynccontextmanager
async def _database_down(url: str) -> AsyncIterator[None]:
    """The controller's database refuses new connections and its open ones are ended (from the
    server's maintenance database), until the block ends."""
    name = make_url(url).database
    engine = create_async_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false'))
            await conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                               {"name": name})
        try:
            yield
        finally:
            async with engine.connect() as conn:
                await conn.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
    finally:
        await engine.dispose()


async def test_a_leader_whose_database_failed_drops_its_heartbeat_lag_and_shows_it_again_when_it_leads(
        database: Database, tmp_path: Path) -> None:
    async with running_controller(database.url, tmp_path, **FAST_LEASE) as app:
        await heard_node(app)
        assert app.metrics_address
        await eventually(lambda: _scrape(app.metrics_address), lambda s: (("rack", "rack-00"),) in s.get(LAG, {}),
                         what="the leader's heartbeat lag")

        async with _database_down(database.url):
            await eventually(lambda: _scrape(app.metrics_address), lambda s: s["maia_leader"][()] == 0,
                             timeout=15.0, what="stepped down")
            # The scrape after (one's cluster read is made before its maia_leader is collected).
            deposed = await _scrape(app.metrics_address)
            assert not app.election.should_run()
            assert LAG not in deposed
            assert deposed["maia_metrics_cluster_read_errors_total"][()] >= 1  # its reads fail: the last one kept ...
            assert deposed["maia_nodes"][(("state", "ready"),)] == 1  # ... for the database's gauges
            assert (("rack", "rack-00"), ("row", "row-a")) in deposed["maia_rack_power_used_watts"]
            assert deposed["maia_lease_losses_total"][()] == 1 and "process_cpu_seconds_total" in deposed

        back = await eventually(lambda: _scrape(app.metrics_address),
                                lambda s: s["maia_leader"][()] == 1 and LAG in s, timeout=15.0,
                                what="leading again, with its lag")
        assert (("rack", "rack-00"),) in back[LAG] and back["maia_lease_acquisitions_total"][()] == 2
