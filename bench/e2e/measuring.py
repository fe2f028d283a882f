"""One run as it goes (`Bench`): what it measured so far (the controller's, its children's, the
database server's, the machine's and the bench's own CPU, peak RSS), the controller's /metrics
scraped (reconcile passes, event-loop lag, the submit and shard-start histograms, heartbeat row
writes) and the progress lines on stderr."""

from __future__ import annotations

import asyncio
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from bench.e2e.cluster import Shape, Work
from bench.e2e.load import Run
from bench.e2e.processes import GATEWAY_MODULE, Process, machine_cpu_s, own_cpu_s
from bench.pgserver import LocalPostgres

SCRAPE_EVERY_S = 30.0  # the controller's /metrics, for the progress lines


@dataclass
class Bench:
    """One run as it goes: what a progress line, and a report of a run stopped part way, read."""

    kind: str
    shape: Shape
    tenants: int
    load: str = ""  # how the submits were offered (closed loop: clients; open loop: a rate)
    phase: str = "starting"
    works: list[Work] = field(default_factory=list)
    run: Run = field(default_factory=Run)
    controller: Process | None = None
    ready: list[int] = field(default_factory=lambda: [0])  # nodes ready, as last asked
    preload_s: float = 0.0
    listed_s: float = 0.0   # from opening the watch to its listing the deployments that exist
    joined_s: float = 0.0
    started: float = 0.0    # the first submit (perf_counter); 0 before
    submitted_s: float = 0.0
    elapsed_s: float = 0.0
    cpu0: float = 0.0
    cpu_s: float = 0.0      # the controller's and its children's (the decide process)
    child_cpu0: float = 0.0
    child_cpu_s: float = 0.0  # of that, its children's while they ran
    gateway_cpu0: float = 0.0
    gateway_cpu_s: float = 0.0  # of those, the agent gateways' (--agent-gateways)
    gateways: int = 0
    others_cpus: frozenset[int] | None = None  # --others-cpus: where the database, the fleets and the clients ran
    machine0: tuple[float, float] = (0.0, 0.0)  # machine_cpu_s() when the submits started
    machine_busy_s: float = 0.0  # the machine's busy CPU since, every core summed
    machine_all_s: float = 0.0   # ... and all of it (cores x seconds)
    own0: float = 0.0
    own_cpu_s: float = 0.0  # this bench process's since
    db_server: LocalPostgres | None = None  # PostgreSQL's server (None: SQLite, in the controller's process)
    db_cpu0: float = 0.0
    db_cpu_s: float = 0.0  # the database server's CPU since the submits started (postmaster and backends)
    db_xacts0: int = 0
    db_xacts: int = 0  # transactions committed or rolled back in the database since (pg_stat_database)
    pg_statements: dict[str, Any] | None = None  # --pg-statements: pg_stat_statements' since the submits
    rss_mib: float = 0.0
    # the host's speed (bench/calibrate.py) before the run started and after it ended, best ms
    calibration_ms: list[float] = field(default_factory=list)
    gateway_rss_mib: float = 0.0  # the agent gateways' peak RSS, summed
    controller_exit: int | None = None
    violations: list[str] | None = None  # None: not graded
    stopped_while: str = ""  # the phase an error or a cancellation stopped
    metrics_url: str = ""
    passes: dict[str, int] = field(default_factory=dict)  # reconcile passes by path, as last scraped
    lag: dict[float, float] = field(default_factory=dict)  # event-loop lag histogram (le -> count), last scraped
    lag_at_start: dict[float, float] = field(default_factory=dict)  # ... when the submits started
    # the controller's own timing of SubmitDeployment (its gRPC handling histogram, le -> count):
    # against the clients' submit latency, what the bench's side and the transport add
    submit_rpc: dict[float, float] = field(default_factory=dict)
    # the controller's maia_shard_start_stage_seconds (stage -> le -> count): commit -> RUNNING recorded
    shard_start: dict[str, dict[float, float]] = field(default_factory=dict)
    shard_start_at_start: dict[str, dict[float, float]] = field(default_factory=dict)  # the join's, subtracted
    # ... the wait before its handler ran (from the time the bench's clients send with each call),
    # and where a batched submit's time went, by stage (each le -> count)
    submit_queued: dict[float, float] = field(default_factory=dict)
    submit_stages: dict[str, dict[float, float]] = field(default_factory=dict)
    # maia_agent_heartbeat_rows_written (perf_counter, count): as last scraped, and when the submits started
    beat_rows: tuple[float, float] | None = None
    beat_rows_at_start: tuple[float, float] | None = None

    def beat_rows_per_s(self) -> float | None:
        """Node rows heartbeats were written to per second from the submits' start to the last
        scrape (every node joined: the steady state `beat` bounds); None: not scraped twice."""
        if self.beat_rows is None or self.beat_rows_at_start is None or self.beat_rows[0] <= self.beat_rows_at_start[0]:
            return None
        return (self.beat_rows[1] - self.beat_rows_at_start[1]) / (self.beat_rows[0] - self.beat_rows_at_start[0])

    def measure(self) -> None:
        """The controller's CPU since the first submit and its peak RSS, while it runs."""
        if self.controller is None or self.controller.proc.poll() is not None:
            return
        try:
            self.cpu_s = self.controller.cpu_s() - self.cpu0
            if self.started:  # since the submits began (a progress line before has no baseline)
                self.child_cpu_s = max(self.child_cpu_s, self.controller.children_cpu_s() - self.child_cpu0)
                self.gateway_cpu_s = max(self.gateway_cpu_s,
                                         self.controller.children_cpu_s(GATEWAY_MODULE) - self.gateway_cpu0)
            self.rss_mib = self.controller.peak_rss_mib()
            if self.gateways:
                self.gateway_rss_mib = max(self.gateway_rss_mib, self.controller.children_peak_rss_mib(GATEWAY_MODULE))
            busy, total = machine_cpu_s()
            self.machine_busy_s, self.machine_all_s = busy - self.machine0[0], total - self.machine0[1]
            self.own_cpu_s = own_cpu_s() - self.own0
            if self.db_server is not None and self.started:
                self.db_cpu_s = self.db_server.cpu_s() - self.db_cpu0
        except OSError:
            pass
        if self.started:
            self.elapsed_s = time.perf_counter() - self.started

    def progress(self, last: tuple[float, int]) -> tuple[str, tuple[float, int]]:
        """One line of where the run is, and the (time, running) pair the next line's rate is from."""
        now = time.perf_counter()
        self.measure()
        head = f"[e2e {self.kind} {self.shape.nodes}] {self.phase}"
        if not self.started:
            return f"{head}: {self.ready[0]}/{self.shape.nodes} nodes ready", last
        t = self.run.times.values()
        sent = sum(1 for x in t if x.submitted)
        acked = sum(1 for x in t if x.acknowledged)
        committed = sum(1 for x in t if x.committed)
        running = self.run.running
        rate = (running - last[1]) / (now - last[0]) if now > last[0] else 0.0
        return (f"{head} {now - self.started:.0f} s: {sent}/{len(self.works)} submitted, {acked} answered, "
                f"{committed} committed, {running} running ({rate:.1f}/s now, "
                f"{running / (now - self.started):.1f}/s overall), {len(self.run.errors)} errors, "
                f"controller CPU {self.cpu_s:.0f} s"), (now, running)


async def report_progress(bench: Bench, every_s: float) -> None:
    last, scraped = (time.perf_counter(), 0), 0.0
    while True:
        await asyncio.sleep(every_s)
        if time.perf_counter() - scraped >= SCRAPE_EVERY_S:
            await scrape_passes(bench)
            scraped = time.perf_counter()
        line, last = bench.progress(last)
        passes = ", ".join(f"{path} {n}" for path, n in sorted(bench.passes.items()))
        print(line + (f" | reconcile passes: {passes}" if passes else ""), file=sys.stderr, flush=True)


async def scrape_passes(bench: Bench) -> None:
    """The controller's reconcile passes by path (full, fast, delta) from its /metrics (a scrape
    also reads the cluster's gauges from the database: hence at most every `SCRAPE_EVERY_S`)."""
    if not bench.metrics_url or bench.controller is None or bench.controller.proc.poll() is not None:
        return
    try:
        text = await asyncio.to_thread(_get, bench.metrics_url)
    except OSError:  # a controller too busy to answer in time: the last count stands
        return
    if m := re.search(r'^maia_agent_heartbeat_rows_written_total (\S+)$', text, re.MULTILINE):
        bench.beat_rows = (time.perf_counter(), float(m.group(1)))
    for m in re.finditer(r'^maia_reconcile_passes_total\{path="(\w+)"\} (\S+)$', text, re.MULTILINE):
        bench.passes[m.group(1)] = int(float(m.group(2)))
    bench.lag = {float(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'^maia_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.MULTILINE)}
    bench.submit_rpc = _submit_buckets(text, "maia_grpc_server_handling_seconds")
    bench.submit_queued = _submit_buckets(text, "maia_grpc_server_queued_seconds")
    bench.submit_stages = _stage_buckets(text, "maia_submit_stage_seconds")
    bench.shard_start = _stage_buckets(text, "maia_shard_start_stage_seconds")


def _submit_buckets(text: str, histogram: str) -> dict[float, float]:
    """The submit calls' series of a histogram by method (le -> count): SubmitDeployment's, and
    SubmitDeployments' added (`--submit-batch`: a call of K, timed as one)."""
    buckets: dict[float, float] = {}
    for m in re.finditer(
            rf'^{histogram}_bucket\{{(?=[^}}]*method="SubmitDeployments?")[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$',
            text, re.MULTILINE):
        buckets[float(m.group(1))] = buckets.get(float(m.group(1)), 0.0) + float(m.group(2))
    return buckets


def _stage_buckets(text: str, histogram: str) -> dict[str, dict[float, float]]:
    """A histogram by its `stage` label (stage -> le -> count)."""
    stages: dict[str, dict[float, float]] = {}
    for m in re.finditer(rf'^{histogram}_bucket\{{(?=[^}}]*stage="(\w+)")[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$',
                         text, re.MULTILINE):
        stages.setdefault(m.group(1), {})[float(m.group(2))] = float(m.group(3))
    return stages


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()
