"""The controller's Prometheus metrics: one registry per controller, every metric declared here.

Two kinds:
- events, counted where they happen through small observer methods (`solved`, `plan_conflict`,
  `placed`, `rpc_handled`): the reconciler and the gRPC interceptor call them and never import
  prometheus_client;
- state, read from the database at scrape time: the HTTP thread of `prometheus_client` asks the
  controller's event loop for one `ClusterGauges` read and one read of the usage counters
  (`run_coroutine_threadsafe`), so the loop is never blocked and two controllers on one database
  report the same cluster. The two run side by side, each with its own timeout and error
  counter: a usage read that fails leaves the nodes, deployments and power gauges in the scrape.
  One series is the leader's own, not the database's: the heartbeat lag (`ClusterGauges.follower_view`).
  It is shown only while this controller leads, from a read begun in that lead, so a controller
  that lost the lease drops it from the very next scrape (`read_cluster`).

Names follow Prometheus conventions: base units in the name (`_seconds`, `_watts`, `_joules`),
counters end in `_total`, labels only from bounded sets (tenants, racks, rows, zones, models,
phases, reason codes, gRPC methods and codes), never deployment names or request ids.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.observability.cluster import ClusterGauges, UsageCounters
from controller.logs import one_line
from controller.scheduling.queue import QueueDepths
from controller.store.db import database_failed

if TYPE_CHECKING:
    from controller.store.checkpoints import CheckpointRound
    from controller.usecases.submits import SubmitStages

log = logging.getLogger("maia.metrics")
T = TypeVar("T")

SOLVE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PLACED_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Fine below 0.1 s: the submit RPC's target is a p99 of 20 ms (issue 8), read from these buckets.
RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25,
                 0.5, 1.0, 2.5, 10.0)
SHARD_START_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 60.0)
ADMISSION_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The cluster read's timeout: well within Prometheus' default scrape timeout (10 s), so a scrape
# during a slow database still answers (and `up` stays 1: no "controller down" for a slow read).
SCRAPE_READ_TIMEOUT_S = 5.0
# A read that failed or timed out is answered with the last one that did not, if it is this
# recent: the series a rule reads would otherwise go stale and restart its `for:` clock, or
# resolve it, for one slow scrape. Older ones are dropped (the errors counter says why). Not the
# leader's own series once the lead it was read in is over: they go with the lease (`read_cluster`).
LAST_READ_KEPT_S = 60.0
# The usage counters' read, from the scrape's start (it runs beside the cluster read): well within
# Prometheus' default scrape timeout (10 s), so a slow one costs the scrape its usage counters only.
USAGE_READ_TIMEOUT_S = 3.0

ClusterReader = Callable[[], Awaitable[ClusterGauges]]
# One cluster read and the lead it began in (`ControllerMetrics._lead`'s count of changes).
_GaugesRead = tuple[int, ClusterGauges]
UsageReader = Callable[[], Awaitable[UsageCounters]]


def split_method(full_method: str) -> tuple[str, str]:
    """'/maia.v1.DeploymentService/Submit' -> ('maia.v1.DeploymentService', 'Submit')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class _Histogram(Histogram):
    """prometheus_client's Histogram, an observation's bucket found by bisection: the library walks
    its bounds one by one in Python (~18 of them for the RPC durations), and the controller
    observes some two dozen values a deployment (RPCs, submit stages, shard start stages). The
    same bucket (the first bound at or above the value); an exemplar or a NaN goes the library's
    way. Labelled children are of this class too (`labels` makes them of the parent's)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar or math.isnan(amount):
            super().observe(amount, exemplar)
            return
        self._raise_if_not_observable()
        self._sum.inc(amount)
        self._buckets[bisect_left(self._upper_bounds, amount)].inc(1)


class _ClusterCollector(Collector):
    """Gauges over one database read and the usage counters over another, made in the
    controller's loop; either missing (failed, timed out) leaves the other's families."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # computed at scrape time; nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        gauges, usage = self._metrics.read_cluster()
        if gauges is not None:
            yield from cluster_families(gauges)
        if usage is not None:
            yield from usage_families(usage)


def _gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def cluster_families(g: ClusterGauges) -> Iterator[Metric]:
    """The metric families of one cluster read."""
    yield _gauge("maia_deployments", "Deployments by phase.", ["phase"],
                 {(phase,): n for phase, n in g.deployments_by_phase.items()})
    yield _gauge("maia_deployments_unplaced",
                 "Deployments with unplaced replicas (fewer placed than asked), under each reason code they carry.",
                 ["reason"], {(code,): n for code, n in g.unplaced_by_reason.items()})
    yield _gauge("maia_tenant_reservation_short_accelerators",
                 "Per tenant with a reservation: accelerators reserved and not held while it has non-preemptible "
                 "work waiting (0 while it waits for nothing): a reservation not honoured.",
                 ["tenant"], {(tenant,): short for tenant, short in g.reservation_short.items()})
    yield _gauge("maia_nodes", "Nodes by state (ready, cordoned, suspect, down).", ["state"],
                 {(state,): n for state, n in g.nodes_by_state.items()})
    yield _gauge("maia_node_heartbeat_lag_max_seconds",
                 "Longest time since the last heartbeat among a rack's up and suspect nodes (the leader only, while "
                 "it leads).",
                 ["rack"], {(rack,): lag for rack, lag in g.heartbeat_lag_max_s.items()})
    yield _gauge("maia_rack_power_used_watts", "Idle power of nodes (not down ones whose work was evicted) plus placed "
                 "shards' power, per rack: what the budget bounds.",
                 ["rack", "row"], {(r.id, r.parent): r.used_w for r in g.racks})
    yield _gauge("maia_rack_power_budget_watts", "Power budget per rack (racks with a budget).", ["rack", "row"],
                 {(r.id, r.parent): r.budget_w for r in g.racks if r.budget_w is not None})
    yield _gauge("maia_rack_power_draw_watts", "Power the agents of a rack's up nodes last reported.", ["rack", "row"],
                 {(r.id, r.parent): r.draw_w for r in g.racks})
    yield _gauge("maia_row_power_used_watts", "Idle power of nodes (not down ones whose work was evicted) plus placed "
                 "shards' power, per row: what the budget bounds.",
                 ["row", "zone"], {(r.id, r.parent): r.used_w for r in g.rows})
    yield _gauge("maia_row_power_budget_watts", "Power budget per row (rows with a budget).", ["row", "zone"],
                 {(r.id, r.parent): r.budget_w for r in g.rows if r.budget_w is not None})
    yield _gauge("maia_accelerators_allocated", "Accelerators held by placed shards (fractions as such).",
                 ["tenant", "model"], dict(g.allocated))
    yield _gauge("maia_accelerators_free", "Accelerators not held on ready nodes (failed ones not counted).",
                 ["model", "zone"], dict(g.free))
    yield _gauge("maia_accelerators_failed", "Accelerators a node's agent says failed (nodes with some): they take "
                 "no shards.", ["node", "rack"], dict(g.failed))


def usage_families(usage: UsageCounters) -> Iterator[Metric]:
    """The usage meter's counters, per (tenant, model, zone)."""
    seconds = CounterMetricFamily("maia_usage_accelerator_seconds",
                                  "Accelerator-seconds used (fractions as such), from the usage records.",
                                  labels=["tenant", "model", "zone"])
    joules = CounterMetricFamily("maia_usage_energy_joules",
                                 "Energy used (shard power plus its share of idle power), from the usage records.",
                                 labels=["tenant", "model", "zone"])
    for (tenant, model, zone), (acc_s, energy_j) in sorted(usage.items()):
        seconds.add_metric([tenant, model, zone], acc_s)
        joules.add_metric([tenant, model, zone], energy_j)
    yield seconds
    yield joules


class ControllerMetrics:
    """The registry and every metric of one controller; `serve()` exposes `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        # First: a scrape makes its reads before the read error counters are collected, so a read
        # that fails is counted in the very scrape it is missing from.
        r.register(_ClusterCollector(self))
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}  # `_labelled`'s
        self._deposed = False  # this controller lost its lead: its passes' gauges say no more (`queue_depths`)
        # (changes of lead so far, leading now), replaced whole: read by the scrapes' threads (`read_cluster`).
        self._lead: tuple[int, bool] = (0, False)
        self.solve_duration = _Histogram("maia_solve_duration_seconds", "Time one solve took, by plan status.",
                                         ["status"], registry=r, buckets=SOLVE_BUCKETS_S)
        self.solves = Counter("maia_solves", "Solves, by plan status.", ["status"], registry=r)
        self.plan_conflicts = Counter("maia_plan_conflicts",
                                      "Plans solved from a stale snapshot (the cluster changed while solving): "
                                      "what still fitted was committed, the pass solved again.", registry=r)
        self.requeued_replicas = Counter("maia_plan_replicas_requeued",
                                         "Replicas a plan placed or moved that no longer fitted the committed state "
                                         "when it was applied: not written, placed again by a later pass.",
                                         registry=r)
        self.failed_released = Counter("maia_failed_replicas_released",
                                       "Replicas with a shard reported FAILED released after their back-off, to be "
                                       "placed again (other nodes first).", registry=r)
        self.submit_to_placed = _Histogram("maia_deployment_submit_to_placed_seconds",
                                           "From a deployment's creation to its first placement.",
                                           registry=r, buckets=PLACED_BUCKETS_S)
        self.rpcs = Counter("maia_grpc_server_handled", "gRPC calls completed, by method and status code.",
                            ["service", "method", "code"], registry=r)
        self.rpc_duration = _Histogram("maia_grpc_server_handling_seconds",
                                       "gRPC unary call duration, by method (streams: counted only).",
                                       ["service", "method"], registry=r, buckets=RPC_BUCKETS_S)
        self.rpc_queue_wait = _Histogram(
            "maia_grpc_server_queued_seconds",
            "From the time a client says it sent a call (metadata maia-sent-at, Unix seconds) to its handler "
            "starting: the wait in the transport and gRPC's queue, which maia_grpc_server_handling_seconds "
            "misses. Only calls that carry it (the benchmarks' clients); meaningful on one clock.",
            ["service", "method"], registry=r, buckets=RPC_BUCKETS_S)
        self.submit_stage = _Histogram(
            "maia_submit_stage_seconds",
            "Where a batched SubmitDeployment's time in the controller went, by stage: validate, queued (for its "
            "batch), reads, checks, writer_turn (SQLite's writer), writes, commit, answer (from the commit to the "
            "caller's task running again).", ["stage"], registry=r, buckets=RPC_BUCKETS_S)
        self.rpcs_shed = Counter("maia_grpc_server_shed", "gRPC calls refused busy (UNAVAILABLE, with a retry time) "
                                 "before the interceptor chain, by method: not in maia_grpc_server_handled.",
                                 ["service", "method"], registry=r)
        self.cluster_read_errors = Counter("maia_metrics_cluster_read_errors",
                                           "Scrapes whose database read failed or timed out.", registry=r)
        self.usage_read_errors = Counter("maia_metrics_usage_read_errors",
                                         "Scrapes whose read of the usage counters failed or timed out (the other "
                                         "gauges are in the scrape; maia_usage_* are not).", registry=r)
        self.events_pruned = Counter("maia_events_pruned", "Events deleted past --event-ttl by this controller "
                                     "while it led (controller/retention.py).", registry=r)
        self.audit_entries_pruned = Counter(
            "maia_audit_entries_pruned", "Audit entries deleted past --audit-ttl by this controller while it led, "
            "the oldest first (controller/retention.py).", registry=r)
        self.leader = Gauge("maia_leader", "1 while this controller holds the leader lease (schedules), else 0.",
                            registry=r)
        self.serving = Gauge("maia_serving", "1 while this controller's readiness (grpc.health.v1) says SERVING, "
                             "0 while NOT_SERVING (the reasons are logged).", registry=r)
        self.serving.set(1)
        # The process's own: resident memory (--max-rss-mib adds the decide process's to it), CPU, open files.
        ProcessCollector(registry=r)
        self.lease_acquisitions = Counter("maia_lease_acquisitions",
                                          "Times this controller acquired the leader lease.", registry=r)
        self.lease_losses = Counter("maia_lease_losses", "Times this controller lost or gave up the leader lease.",
                                    registry=r)
        self.loop_lag = _Histogram("maia_event_loop_lag_seconds",
                                   "How much later than asked a 0.1 s timer fired on the event loop: the time any "
                                   "request, agent stream or loop waited behind other work (observability/loop.py).",
                                   registry=r, buckets=RPC_BUCKETS_S)
        self.reconcile_passes = Counter(
            "maia_reconcile_passes", "Reconcile passes by path: full (read and solved the whole "
            "cluster), fast (decided on the warm session), delta (only applied others' changes to the warm cache); "
            "idle: passes that found the cluster unchanged (the generation and the arrivals as the last pass left "
            "them), after stopping replaced replicas or releasing failed ones if any were due.",
            ["path"], registry=r)
        self.scheduling_queue = Gauge("maia_scheduling_queue_deployments",
                                      "Deployments in the reconciler's scheduling queue: active (not attempted yet), "
                                      "backoff (one more try by the full solve due), unschedulable (none of it placed, "
                                      "waiting for a change that could help; a deployment placed in part and short "
                                      "of replicas is in maia_deployments{phase=\"degraded\"}).", ["queue"], registry=r)
        self.nominated_nodes = Gauge("maia_scheduling_nominated_nodes",
                                     "Nodes nominated for the deployments waiting at the head of the line (one a "
                                     "zone): no new shard of another deployment of their priority or lower lands "
                                     "there until they fit (0: none; docs/operations.md, \"Head-of-line "
                                     "nominations\").",
                                     registry=r)
        self.agents_admitted = Counter("maia_agent_admission_admitted",
                                       "Agent Registers and Connect hellos let in by the admission gate.", registry=r)
        self.agents_refused = Counter("maia_agent_admission_refused",
                                      "Agent Registers and hellos refused at once with a retry time, by reason "
                                      "(deadline: would wait longer than its deadline leaves; waited_out: queued, its "
                                      "turn had not come in time; queue_full).",
                                      ["reason"], registry=r)
        self.agents_abandoned = Counter("maia_agent_admission_abandoned",
                                        "Agent calls that left the admission queue before their turn "
                                        "(deadline passed or cancelled) while the gate still let them wait.", registry=r)
        self.agents_late = Counter("maia_agent_admission_late",
                                   "Agent calls whose refusal from the admission queue was due before their "
                                   "deadline but ran after it ended: the event loop was stalled longer than the "
                                   "gate's reserve (a starved machine, a long synchronous step).", registry=r)
        self.agents_admission_wait = _Histogram("maia_agent_admission_wait_seconds",
                                                "Time an admitted agent call waited in the admission queue.",
                                                registry=r, buckets=ADMISSION_WAIT_BUCKETS_S)
        self.agents_waiting = Gauge("maia_agent_admission_waiting", "Agent calls waiting in the admission queue now.",
                                    registry=r)
        self.shard_start = _Histogram(
            "maia_shard_start_stage_seconds",
            "A shard's way from its commit to RUNNING recorded, by stage (controller/agents/, "
            "HubObserver): push (a node's set changed -> handed to its stream), agent (that set -> the "
            "agent's RUNNING report received, its load time included), flush_wait (a shard report received -> "
            "the flush that writes it began), flush_write (that flush began -> the report's chunk committed).",
            ["stage"], registry=r, buckets=SHARD_START_BUCKETS_S)
        self.heartbeat_rows = Counter(
            "maia_agent_heartbeat_rows_written",
            "Node rows heartbeats were written to (committed flushes, controller/agents/reports.py): while a node's "
            "stream lives, at most one per contact_write_every_s unless its power draw changed.", registry=r)
        self.wal_checkpoint = _Histogram(
            "maia_sqlite_wal_checkpoint_seconds",
            "SQLite: the checkpointer's checkpoints, off the commit path (store/checkpoints.py: the log's new pages "
            "copied into the database file, both synced), by outcome: complete (the log wholly copied: the next "
            "writer starts it again), partial (a reader still needed some frames, or commits came meanwhile), "
            "busy (another checkpoint was running).",
            ["outcome"], registry=r, buckets=RPC_BUCKETS_S)
        self.wal_frames = Gauge("maia_sqlite_wal_frames",
                                "SQLite: frames (pages) in the write-ahead log at the last checkpoint.", registry=r)
        self.wal_frames_uncopied = Gauge(
            "maia_sqlite_wal_frames_uncopied",
            "SQLite: of those, frames the last checkpoint could not copy yet (a reader's snapshot needed them); "
            "a commit checkpoints itself past checkpoints.COMMIT_CHECKPOINT_PAGES.", registry=r)
        self._reader: ClusterReader | None = None
        self._usage_reader: UsageReader | None = None
        self._leading: Callable[[], bool] | None = None  # `watch_cluster`'s
        self._last_gauges = _LastRead[_GaugesRead]()
        self._last_usage = _LastRead[UsageCounters]()
        self._usage_shown = _UsageHighWater()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = threading.Lock()  # one scrape's reads at a time (`read_cluster`)
        self._last_read: tuple[float, tuple[_GaugesRead | None, UsageCounters | None]] | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- events ---------------------------------------------------------------------------------
    def solved(self, status: str, seconds: float) -> None:
        self.solves.labels(status).inc()
        self.solve_duration.labels(status).observe(seconds)

    def plan_conflict(self) -> None:
        self.plan_conflicts.inc()

    def requeued(self, replicas: int) -> None:
        self.requeued_replicas.inc(replicas)

    def failed_replicas_released(self, replicas: int) -> None:
        self.failed_released.inc(replicas)

    def placed(self, latencies_s: Iterable[float]) -> None:
        for latency in latencies_s:
            self.submit_to_placed.observe(latency)

    def queue_depths(self, depths: QueueDepths, *, deposed: bool = False) -> None:
        """The leader's passes' word (a pass in flight when the lease went says nothing more)."""
        if self._deposed and not deposed:
            return
        for queue in ("active", "backoff", "unschedulable"):
            self.scheduling_queue.labels(queue).set(getattr(depths, queue))

    def nominated(self, nodes: int, *, deposed: bool = False) -> None:
        if self._deposed and not deposed:
            return
        self.nominated_nodes.set(nodes)

    def shard_start_stage(self, stage: str, seconds: Iterable[float]) -> None:
        histogram = self._labelled(self.shard_start, stage)
        for value in seconds:
            histogram.observe(value)

    def heartbeats_written(self, rows: int) -> None:
        self.heartbeat_rows.inc(rows)

    def wal_checkpointed(self, done: CheckpointRound) -> None:
        outcome = "busy" if done.busy else "complete" if done.complete else "partial"
        self._labelled(self.wal_checkpoint, outcome).observe(done.seconds)
        if done.busy:  # SQLite said nothing of the log (-1, -1): the gauges keep what the last round saw
            return
        self.wal_frames.set(done.wal_frames)
        self.wal_frames_uncopied.set(max(0, done.wal_frames - done.checkpointed_frames))

    def loop_lagged(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def pass_taken(self, path: str) -> None:
        self.reconcile_passes.labels(path).inc()

    def leadership_changed(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)
        (self.lease_acquisitions if leading else self.lease_losses).inc()
        self._deposed = not leading
        self._lead = (self._lead[0] + 1, leading)  # reads begun in the lead before show no leader-only series
        if not leading:  # what only the leader's passes set: a follower's last word stood beside the leader's
            self.queue_depths(QueueDepths(), deposed=True)
            self.nominated(0, deposed=True)

    def admission_admitted(self, waited_s: float) -> None:
        self.agents_admitted.inc()
        self.agents_admission_wait.observe(waited_s)

    def admission_refused(self, reason: str) -> None:
        self.agents_refused.labels(reason).inc()

    def admission_abandoned(self) -> None:
        self.agents_abandoned.inc()

    def admission_late(self) -> None:
        self.agents_late.inc()

    def _labelled(self, metric: Counter | Histogram, *values: str) -> Any:
        """`metric.labels(*values)`, kept: these are observed on every RPC, and each `labels` call
        checks and looks up its values under a lock (with `submit_staged`'s eight, about half of the
        ~3 % of the event loop's samples the metrics took in `bench unary`'s submits)."""
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def rpc_handled(self, full_method: str, code: str, seconds: float | None) -> None:
        service, method = split_method(full_method)
        self._labelled(self.rpcs, service, method, code).inc()
        if seconds is not None:  # None: a stream's (`RpcObserver.rpc_handled`)
            self._labelled(self.rpc_duration, service, method).observe(seconds)

    def rpc_queued(self, full_method: str, seconds: float) -> None:
        self._labelled(self.rpc_queue_wait, *split_method(full_method)).observe(seconds)

    def submit_staged(self, stages: SubmitStages) -> None:
        for stage, seconds in stages.items():
            self._labelled(self.submit_stage, stage).observe(seconds)

    def rpc_shed(self, full_method: str) -> None:
        self.rpcs_shed.labels(*split_method(full_method)).inc()

    # --- state read at scrape time --------------------------------------------------------------
    def watch_cluster(self, loop: asyncio.AbstractEventLoop, reader: ClusterReader,
                      usage: UsageReader | None = None, leading: Callable[[], bool] | None = None) -> None:
        """Scrapes read the cluster through `reader` and the usage counters through `usage`, run
        in `loop` (the controller's). `leading`: whether the lease is held now (the election's
        `should_run`, from any thread): false as the lease runs out, before the step-down is told
        (`leadership_changed`), and the leader's own series go then."""
        self._loop, self._reader, self._usage_reader = loop, reader, usage
        self._leading = leading

    def watch_alarms(self, count: Callable[[], int], violated: Callable[[], int]) -> None:
        """The isolation watchdog's alarm count and the violations it finds now, exported as
        `maia_isolation_watchdog_alarms_total` and `maia_isolation_watchdog_violations`."""
        self.registry.register(_AlarmCollector(count, violated))

    def watch_health(self, serving: Callable[[], bool]) -> None:
        """The health monitor's answer, read at scrape time (`maia_serving`)."""
        self.serving.set_function(lambda: float(serving()))

    def watch_admission(self, waiting: Callable[[], int]) -> None:
        """The agent admission queue's depth, read at scrape time."""
        self.agents_waiting.set_function(lambda: float(waiting()))

    def read_cluster(self) -> tuple[ClusterGauges | None, UsageCounters | None]:
        """One scrape's reads in the controller's loop, waited for from the HTTP thread: the
        cluster's gauges and the usage counters, started together, each waited for up to its own
        timeout from the start (None: failed or timed out, counted in its own error counter).
        Scrapes that come while one reads share its reads: each ran its own on the event loop
        (the port asks no token; 32 at once were 32 whole-cluster reads).

        The leader's own series (the heartbeat lag, `ClusterGauges.follower_view`) are in the
        answer only while this controller leads, and only from a read begun in this lead: a
        controller that lost the lease (the database failed, another took it) kept answering
        failed reads with its last one, lag included, for up to `LAST_READ_KEPT_S`, beside the
        new leader's lag for the same racks. Its other gauges are any controller's (the shared
        database's) and stay kept."""
        arrived = time.monotonic()
        with self._reading:
            last = self._last_read
            if last is not None and last[0] > arrived:  # ended after this scrape came: under way then
                read = last[1]
            else:
                read = self._read_cluster_now()
                self._last_read = (time.monotonic(), read)
        gauges, usage = read
        return None if gauges is None else self._as_led_now(gauges), usage

    def _as_led_now(self, read: _GaugesRead) -> ClusterGauges:
        """A read's gauges as this controller may show them now: its own series only from a read
        begun in the lead it holds now."""
        lead, gauges = read
        leading = self._lead == (lead, True) and (self._leading is None or self._leading())
        return gauges if leading else gauges.follower_view()

    def _read_cluster_now(self) -> tuple[_GaugesRead | None, UsageCounters | None]:
        loop = self._loop
        if self._reader is None or loop is None or loop.is_closed():
            return None, None
        lead = self._lead[0]  # before the read: one the lease changed under is not this lead's
        started = time.monotonic()
        gauges = asyncio.run_coroutine_threadsafe(self._reader(), loop)
        usage = asyncio.run_coroutine_threadsafe(self._usage_reader(), loop) if self._usage_reader else None
        fresh = _waited(gauges, SCRAPE_READ_TIMEOUT_S, self.cluster_read_errors, "the cluster state")
        read_gauges = self._last_gauges.kept(None if fresh is None else (lead, fresh))
        read_usage = None if usage is None else self._last_usage.kept(_waited(
            usage, USAGE_READ_TIMEOUT_S - (time.monotonic() - started), self.usage_read_errors, "the usage counters"))
        return read_gauges, None if read_usage is None else self._usage_shown.of(read_usage)

    # --- the endpoint ---------------------------------------------------------------------------
    def serve(self, listen: str) -> str:
        """Serve `/metrics` on HOST:PORT (port 0: any free port) from a thread; returns HOST:PORT."""
        host, _, port = listen.rpartition(":")
        try:
            self._server, self._thread = _serve_metrics(host.strip("[]") or "0.0.0.0", int(port), self.registry)
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot serve metrics on {listen}: {exc}") from exc
        return f"{host}:{self._server.server_port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


METRICS_PATH = "/metrics"


def _serve_metrics(host: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    """prometheus_client's exposition on `METRICS_PATH` alone, from a daemon thread. Its own
    server answers every path with the metrics: an HTTP probe pointed at /healthz on this port
    would have read 200 whatever the controller's health."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: this port serves {METRICS_PATH} only; the controller's health is "
                f"grpc.health.v1 on its API port (python -m controller.healthcheck)\n".encode()]

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="maia-metrics-http", daemon=True)
    thread.start()
    return server, thread


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a line a scrape is not a log
        pass


def _waited(future: concurrent.futures.Future[T], timeout_s: float, errors: Counter, what: str) -> T | None:
    """`future`'s result within `timeout_s` (what is left of it), else None, counted in `errors`."""
    try:
        return future.result(max(0.0, timeout_s))
    except concurrent.futures.TimeoutError:
        future.cancel()
        errors.inc()
        log.warning("metrics: reading %s took longer than %.1fs; the scrape answers without it, or with the "
                    "last read of the past %.0fs", what, max(0.0, timeout_s), LAST_READ_KEPT_S)
        return None
    except Exception as exc:
        future.cancel()
        errors.inc()
        if database_failed(exc):  # an outage: a line a scrape says so, without a traceback each time
            log.warning("metrics: reading %s failed: the database failed: %s; the scrape answers with the last read "
                        "of the past %.0fs, or without it", what, one_line(exc), LAST_READ_KEPT_S)
        else:
            log.exception("metrics: reading %s failed", what)
        return None


class _UsageHighWater:
    """The usage counters as `/metrics` shows them: each never less than it showed before. A read
    can be lower than the one before it: an interval the earlier read counted as open, to its own
    `now`, was closed meanwhile at a time stamped before its transaction committed (or by a
    controller whose clock is behind). A counter that goes back is a reset to Prometheus, and
    `increase()` over it counted the tenant's whole usage again."""

    def __init__(self) -> None:
        self._shown: UsageCounters = {}
        self._lock = threading.Lock()  # scrapes may run at once, each in a thread of the server's

    def of(self, usage: UsageCounters) -> UsageCounters:
        with self._lock:
            shown = self._shown
            self._shown = {}
            for key, (seconds, joules) in usage.items():
                was_seconds, was_joules = shown.get(key, (0.0, 0.0))
                self._shown[key] = (max(seconds, was_seconds), max(joules, was_joules))
            return self._shown


class _LastRead(Generic[T]):
    """The last read that did not fail, for the scrapes whose read fails within `LAST_READ_KEPT_S`."""

    def __init__(self) -> None:
        self._value: T | None = None
        self._at = 0.0

    def kept(self, value: T | None) -> T | None:
        now = time.monotonic()
        if value is not None:
            self._value, self._at = value, now
            return value
        return self._value if now - self._at <= LAST_READ_KEPT_S else None


class _AlarmCollector(Collector):
    def __init__(self, count: Callable[[], int], violated: Callable[[], int]) -> None:
        self._count, self._violated = count, violated

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("maia_isolation_watchdog_alarms", "Isolation violations the watchdog found.")
        family.add_metric([], float(self._count()))
        yield family
        # An alarm is counted once, when found: a violation that stands is this gauge's.
        yield GaugeMetricFamily("maia_isolation_watchdog_violations",
                                "Placement rule violations the leader's watchdog finds now (0 on a follower).",
                                value=float(self._violated()))
