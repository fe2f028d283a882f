"""The leader's own series go from `/metrics` with its lead, and come back with the next one.

The heartbeat lag (`maia_node_heartbeat_lag_max_seconds`) is the one cluster series only the
leader knows (it holds the agents' streams); the others are read from the shared database, the
same on every controller. A leader that lost the lease because the database failed answered its
failed reads with the last one that did not, lag included, for up to `LAST_READ_KEPT_S` (60 s):
two controllers reported the same racks' lag, the stale one beside the new leader's.
"""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from controller.observability.cluster import ClusterGauges, PowerDomain
from controller.observability.metrics import ControllerMetrics

LAG = "maia_node_heartbeat_lag_max_seconds"
READ = ClusterGauges(nodes_by_state={"ready": 4, "cordoned": 0, "suspect": 0, "down": 0},
                     heartbeat_lag_max_s={"rack-00": 1.5, "rack-01": 0.5},
                     racks=(PowerDomain("rack-00", "row-a", 2_000.0, 20_000.0, 1_800.0),))


class _Database:
    """A cluster read that answers `READ`, fails as a database that went away, or waits to be let go."""

    def __init__(self) -> None:
        self.down = False
        self.held: asyncio.Event | None = None
        self.reads = 0

    async def read(self) -> ClusterGauges:
        self.reads += 1
        if self.held is not None:
            await self.held.wait()
        if self.down:
            raise OperationalError("SELECT", None, ConnectionRefusedError("connection refused"))
        return READ


def _watching(database: _Database) -> ControllerMetrics:
    metrics = ControllerMetrics()
    metrics.watch_cluster(asyncio.get_running_loop(), database.read)
    return metrics


Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def _scrape(metrics: ControllerMetrics) -> Series:
    """One scrape's samples by name, then labels. Made in a thread: it asks this loop for the read."""
    text = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return series


async def test_a_leader_that_lost_the_lease_with_the_database_drops_its_lag_and_shows_it_again_when_it_leads() -> None:
    database = _Database()
    metrics = _watching(database)
    metrics.leadership_changed(True)
    assert (await _scrape(metrics))[LAG] == {(("rack", "rack-00"),): 1.5, (("rack", "rack-01"),): 0.5}

    database.down = True  # the renewals fail with the reads: the lease runs out
    metrics.leadership_changed(False)
    scraped = await _scrape(metrics)
    assert LAG not in scraped
    # The database's own gauges stay as any follower's would (its last read, for a minute) ...
    assert (("state", "ready"),) in scraped["maia_nodes"]
    assert scraped["maia_rack_power_used_watts"] and scraped["maia_rack_power_draw_watts"]
    # ... and so does what the process says of itself, and the read's failure.
    assert {"maia_leader", "maia_lease_losses_total", "maia_metrics_cluster_read_errors_total",
            "process_cpu_seconds_total"} <= set(scraped)
    assert scraped["maia_metrics_cluster_read_errors_total"][()] == 1 and scraped["maia_leader"][()] == 0

    database.down = False  # back: this controller leads again, its lag read in its new lead
    metrics.leadership_changed(True)
    assert LAG in await _scrape(metrics)


async def test_a_read_the_lease_changed_under_shows_no_lag_now_nor_kept_for_the_next_lead() -> None:
    """A read begun before the lease went (it waited on a slow database) ends after: its lag is of
    a lead that is over, even when this controller leads again by the time it is shown or kept."""
    database = _Database()
    metrics = _watching(database)
    metrics.leadership_changed(True)
    database.held = asyncio.Event()
    scrape = asyncio.create_task(_scrape(metrics))
    while not database.reads:
        await asyncio.sleep(0.01)
    metrics.leadership_changed(False)  # lost, and taken again, while the read waits
    metrics.leadership_changed(True)
    database.held.set()
    scraped = await scrape
    assert LAG not in scraped and (("state", "ready"),) in scraped["maia_nodes"]

    database.held, database.down = None, True  # the next read fails: the kept read has no lag either
    scraped = await _scrape(metrics)
    assert LAG not in scraped and (("state", "ready"),) in scraped["maia_nodes"]
    database.down = False  # one begun in this lead has it
    assert LAG in await _scrape(metrics)


async def test_the_lag_goes_as_the_lease_runs_out_before_the_step_down_is_told() -> None:
    # The election's `should_run` turns false at the lease's end; its step-down is told later,
    # once the renewal stuck on the database gives up (the lease's TTL): a read failing meanwhile
    # was answered with the kept one, lag included, beside the next leader's.
    database, leads = _Database(), [True]
    metrics = ControllerMetrics()
    metrics.watch_cluster(asyncio.get_running_loop(), database.read, leading=lambda: leads[0])
    metrics.leadership_changed(True)
    assert LAG in await _scrape(metrics)
    database.down, leads[0] = True, False
    scraped = await _scrape(metrics)
    assert LAG not in scraped and (("state", "ready"),) in scraped["maia_nodes"]
    database.down, leads[0] = False, True  # renewed in time after all: the same lead goes on
    assert (await _scrape(metrics))[LAG] == {(("rack", "rack-00"),): 1.5, (("rack", "rack-01"),): 0.5}
