"""End to end: a real `maia-controller`, real `maia-simnode` fleets, concurrent gRPC clients.

What a lab sees, measured at the client: N concurrent clients submit single-shard, node-local
deployments and, spread among them, gangs (one replica of 8..64 shards, row-local), and delete
some of their own running deployments as they go. A watcher on `WatchDeploymentBatches` timestamps
when each deployment is committed (every replica placed) and when it runs. The controller is
its own process (authentication on: the bootstrap admin token, as `make demo` runs it), its
CPU seconds and peak RSS read from /proc. On SQLite and on a throwaway PostgreSQL started the
way the tests start theirs (`bench/pgserver.py`).

Ends by grading the committed state, read from the database once the controller has stopped,
with the independent checker of the test suite (`tests/scheduler/checker.py`).

`--preload N` starts from a cluster already holding N running single-shard deployments
(`bench.preload`: written into the database before the controller starts, the nodes as the
fleets describe them; the fleets then join as existing nodes and are handed their shards):
"4,096 nodes holding 10,000 placements" in seconds instead of an hour of submits. The submitted
workload then asks for `--fill` of the accelerators the preload left free. Tenants are as many
as keep each under `PER_TENANT` deployments (`limits.DEPLOYMENTS_PER_TENANT_MAX`).

    python -m bench e2e --nodes 256 --db sqlite postgres
    python -m bench e2e --nodes 4096 --preload 10000 --db sqlite
    python -m bench e2e --nodes 4096 --preload 10000 --db sqlite --rate 250   # open loop
    python -m bench e2e --nodes 16384 --db sqlite --shared-channel --fleets 32 --fleets-at-once --stagger 1 \
        --fleet-nice 19 --heartbeat-timeout 30 --join-timeout 840   # the 16,384-node join of `bench join`

Two ways to offer the load. Closed loop (`--clients N`, the default): N clients, each sending its
next submit once the last was answered; at saturation a submit's latency is N / the rate (the
clients' own queue), not the submit's work. Open loop (`--rate R`): submits sent at arrival times
R a second apart on average (`--arrivals poisson|even`), whatever the earlier ones' answers, so
the latency is that of a submit at that offered load; the bench reports how late it sent
(a client too busy to keep to the arrivals measures less than it offers).

`--submit-batch K` (closed loop): each client sends its next up to K single-shard deployments in
one SubmitDeployments call (a gang still alone, in a SubmitDeployment), each deployment's submit
latency that of its call; the controller's submit histogram then counts calls of either kind.
K = 1, the default, is one SubmitDeployment a deployment, as before the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procfs
from bench.fgd import percentile
from bench.pgserver import LocalPostgres, create_database, find_pg_bin_dir
from bench.preload import Layout, preload
from controller import limits
from controller.api.interceptors import SENT_AT_METADATA_KEY
from controller.main import SHUTDOWN_DEADLINE_S
from controller.observability.loop import watch_event_loop

NODES_PER_RACK = 16
GATEWAY_MODULE = "controller.gateway"  # the agent gateways' command line (their CPU is reported apart)
GANG_SIZES = (8, 16, 32, 64)
PER_TENANT = 400  # submitted deployments per tenant, at most (under limits.DEPLOYMENTS_PER_TENANT_MAX)
MIN_TENANTS = 4
SCRAPE_EVERY_S = 30.0  # the controller's /metrics, for the progress lines
TENANTS = ("lab-a", "lab-b", "lab-c", "lab-d")  # bench nodedeath's


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, nargs="+", default=[256],
                   help="simulated nodes (multiples of 16: racks of 16 nodes x 4 accelerators)")
    p.add_argument("--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    p.add_argument("--clients", type=int, default=16,
                   help="concurrent gRPC clients, each submitting its next deployment when the last was answered "
                        "(closed loop: at saturation a submit's latency is clients / rate, the clients' queue)")
    p.add_argument("--rate", type=float, default=0.0, metavar="PER_S",
                   help="open loop instead: deployments offered at this rate, each submitted at its arrival time "
                        "whatever the answers to the earlier ones (submit latency at a load below saturation); "
                        "0: closed loop (--clients)")
    p.add_argument("--arrivals", choices=["poisson", "even"], default="poisson",
                   help="open loop: exponential gaps between arrivals (poisson) or evenly spaced ones")
    p.add_argument("--submit-batch", type=int, default=1, metavar="K",
                   help="closed loop: each client sends up to K (at most 1000) single-shard deployments per "
                        "SubmitDeployments call (gangs one per call); 1 (the default): one SubmitDeployment each")
    p.add_argument("--fill", type=float, default=0.5,
                   help="share of the cluster's accelerators the submitted deployments ask for")
    p.add_argument("--gang-share", type=float, default=0.25,
                   help="share of the requested accelerators that comes in gangs of 8..64 shards")
    p.add_argument("--delete-every", type=int, default=10,
                   help="delete every this many-th deployment to start running, during the run (0: none)")
    p.add_argument("--deleters", type=int, default=1, metavar="N",
                   help="concurrent deleting clients, each sending its next delete once the last was answered "
                        "(1: one delete after another, never two at the controller at once; more: deletes "
                        "that arrive together, which the controller marks in one batch)")
    p.add_argument("--preload", type=int, default=0, metavar="PLACEMENTS",
                   help="start from a cluster already running this many single-shard deployments "
                        "(written into the database before the controller starts)")
    p.add_argument("--fleets", type=int, default=0,
                   help="maia-simnode processes, started one after the other (0: one per 256 nodes)")
    p.add_argument("--load-delay", type=float, default=0.2, help="simnode LOADING -> RUNNING seconds")
    p.add_argument("--shared-channel", action="store_true",
                   help="each fleet's nodes share one connection to the controller (maia-simnode --shared-channel): "
                        "less of the machine goes to the fleets at 4,096 nodes and more")
    p.add_argument("--fleets-at-once", action="store_true",
                   help="start every fleet at once and wait for all of them (as `bench join` does), not one "
                        "after the other: with --stagger 1, 16,384 nodes join in about ten minutes, not hours")
    p.add_argument("--join-timeout", type=float, default=120.0,
                   help="seconds each fleet has to join (with --fleets-at-once: all of them together)")
    p.add_argument("--stagger", type=float, default=None,
                   help="seconds between one node's start and the next in a fleet (maia-simnode --stagger; "
                        "default: its own)")
    p.add_argument("--fleet-nice", type=int, default=0,
                   help="run the fleets this much nicer than the controller (as `bench join --fleet-nice`)")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="the controller's --heartbeat-timeout (agents heartbeat every third of it; default: its own)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up waiting for Running after this")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--controller-log-level", default="WARNING", help="the controller's --log-level")
    p.add_argument("--decide-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the controller's --decide-process / --no-decide-process (default: its default); "
                        "controller CPU counts the decide process's too")
    p.add_argument("--agent-gateways", type=int, default=0, metavar="N",
                   help="the controller serves the agents from N gateway processes (maia-controller "
                        "--agent-gateways); the fleets connect to them; their CPU is counted in the controller's "
                        "and reported apart")
    p.add_argument("--agent-gateway-linger-ms", type=float, default=None, metavar="MS",
                   help="maia-controller --agent-gateway-linger-ms (with --agent-gateways; default: its default)")
    p.add_argument("--pg-statements", type=int, default=0, metavar="N",
                   help="PostgreSQL: load pg_stat_statements, reset it as the submits start and report the N "
                        "statements that took the server's time (and the totals) up to the last Running")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, SQLite file)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="a progress line on stderr this often (phase, deployments submitted, committed, "
                        "running, the rate); 0: none")
    p.add_argument("--py-spy", metavar="PATH",
                   help="profile the controller during the run with this py-spy binary: collapsed stacks "
                        "in <run dir>/controller.pyspy.txt (implies --keep; py-spy --nonblocking: sampling never "
                        "pauses the controller, whose stalls would otherwise be the profile)")


# --- processes --------------------------------------------------------------------------------

class Process:
    """A child process whose CPU time and peak memory are read from /proc."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self._log = log.open("w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})})

    def nicer(self, by: int) -> None:
        """Run this process `by` nicer than this one (a stand-in for other machines: simnode fleets)."""
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + by))

    def cpu_s(self) -> float:
        """CPU seconds of the process and of the children it started (the controller's decide
        process: running, or exited and reaped), so that CPU moved to a child still counts."""
        return procfs.tree_cpu_s(self.proc.pid)

    def children_cpu_s(self, named: str = "") -> float:
        """CPU seconds of the children it runs now (`named`: those whose command line holds it)."""
        return sum(procfs.ticks(fields) for _, fields in procfs.children(self.proc.pid, named)) / os.sysconf("SC_CLK_TCK")

    def children_peak_rss_mib(self, named: str) -> float:
        """The peak RSS of the children running now whose command line holds `named`, summed."""
        return sum(_peak_rss_mib(pid) for pid, _ in procfs.children(self.proc.pid, named))

    def peak_rss_mib(self) -> float:
        return _peak_rss_mib(self.proc.pid)

    def read_line(self, prefix: str, timeout_s: float) -> str:
        """The rest of the first stdout line starting with `prefix`."""
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.name} did not print {prefix!r} in {timeout_s:.0f} s")

    def stop(self, grace_s: float = 20.0, *, told: bool = False) -> int:
        """SIGTERM (unless `told`: sent already), `grace_s` to exit, then SIGKILL; its exit code."""
        if self.proc.poll() is None:
            if not told:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def stop_all(processes: list[Process], grace_s: float = 20.0) -> None:
    """Stop them all within one grace period: every one is told first, then each is waited for
    (one after the other, 32 fleets could take 32 grace periods), and not told again (a second
    SIGTERM: one that lands after a fleet's loop closed would kill it, exit -15)."""
    for process in processes:
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.stop(max(0.0, deadline - time.monotonic()), told=True)


def machine_cpu_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, every core summed (/proc/stat's
    first line; idle and iowait are not busy): what is left of the machine for the controller."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - fields[3] - fields[4]) / tick, total / tick


def own_cpu_s() -> float:
    """CPU seconds of this process (the bench's clients, watch and scrapes)."""
    t = os.times()
    return t.user + t.system


def _peak_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@asynccontextmanager
async def database(kind: str, root: Path) -> AsyncIterator[str]:
    """A fresh database URL: a SQLite file, or a database on a PostgreSQL started as the tests do."""
    async with database_server(kind, root) as (url, _server):
        yield url


# pg_stat_statements, loaded with --pg-statements: top-level statements only, so that their times
# add up to the server's work (a trigger's statements are in the time of the one that fired it).
PG_STATEMENTS_SETTINGS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "top",
                          "pg_stat_statements.max": "10000"}


@asynccontextmanager
async def database_server(kind: str, root: Path, *, statements: bool = False
                          ) -> AsyncIterator[tuple[str, LocalPostgres | None]]:
    """`database`'s URL and the PostgreSQL server it is on (None: SQLite), for its CPU time;
    `statements`: the server loads pg_stat_statements and the database has the extension."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{root / 'maia.db'}", None
        return
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (make postgres)")
    server = LocalPostgres(bin_dir, PG_STATEMENTS_SETTINGS if statements else None)
    try:
        url = await create_database(server.start(), prefix="maia_bench")
        if statements:
            await _pg_execute(url, "CREATE EXTENSION pg_stat_statements")
        yield url, server
    finally:
        server.stop()


async def _pg_execute(url: str, sql: str) -> list[Any]:
    """The rows of one statement on a connection of its own (the bench's, not the controller's)."""
    import asyncpg
    from bench.pgserver import asyncpg_dsn
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


PG_STATEMENTS_SQL = """
SELECT calls, rows, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC"""
PG_XACTS_SQL = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"


async def pg_statements_since_reset(url: str, top: int) -> dict[str, Any]:
    """pg_stat_statements since its reset: totals and the `top` statements by execution time."""
    rows = await _pg_execute(url, PG_STATEMENTS_SQL)
    return {"calls": sum(r["calls"] for r in rows), "exec_ms": round(sum(r["total_exec_time"] for r in rows)),
            "statements": len(rows),
            "top": [{"calls": r["calls"], "rows": r["rows"], "exec_ms": round(r["total_exec_time"], 1),
                     "query": r["query"]} for r in rows[:top]]}


# --- the cluster --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    nodes: int
    fleets: int
    preloaded: int = 0  # placements (single-shard deployments) written before the start

    @property
    def racks(self) -> int:
        return self.nodes // NODES_PER_RACK

    def fleet_racks(self) -> list[tuple[str, int]]:
        """(rack prefix, racks) per simnode process."""
        per, extra = divmod(self.racks, self.fleets)
        return [(f"f{i}-rack-", per + (1 if i < extra else 0)) for i in range(self.fleets)]

    def layout(self) -> Layout:
        return Layout(tuple(self.fleet_racks()), NODES_PER_RACK)

    def topology(self) -> Any:
        from maia.v1 import admin_pb2
        layout = self.layout()
        rows = layout.rows()
        return admin_pb2.Topology(
            zones=[admin_pb2.Zone(id=z) for z in dict.fromkeys(rows.values())],
            rows=[admin_pb2.Row(id=r, zone=z) for r, z in rows.items()],
            racks=[admin_pb2.Rack(id=k, row=r) for k, r in layout.rack_rows().items()])


@dataclass(frozen=True)
class Work:
    name: str
    tenant: str
    shards: int  # one replica of this many one-accelerator shards

    def spec(self) -> Any:
        from maia.v1 import common_pb2, deployments_pb2
        return deployments_pb2.DeploymentSpec(
            name=self.name, tenant=self.tenant, replicas=1, shards_per_replica=self.shards,
            shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=16, power_w=300),
            locality=common_pb2.DOMAIN_NODE if self.shards == 1 else common_pb2.DOMAIN_ROW)


def tenants_for(shape: Shape, args: argparse.Namespace) -> list[str]:
    """Enough tenants that none is sent more than `PER_TENANT` deployments (an upper bound: as
    if every accelerator asked for were a deployment of its own)."""
    count = max(MIN_TENANTS, -(-int((shape.nodes * 4 - shape.preloaded) * args.fill) // PER_TENANT))
    return [f"lab-{i:03d}" for i in range(count)]


def workload(shape: Shape, args: argparse.Namespace) -> list[Work]:
    """Singles and gangs in a random arrival order, asking for `fill` of the accelerators the
    preload left free; the tenants in turn."""
    rng = random.Random(args.seed)
    tenants = tenants_for(shape, args)
    wanted = int((shape.nodes * 4 - shape.preloaded) * args.fill)
    gang_accels = int(wanted * args.gang_share)
    sizes: list[int] = []
    while sum(sizes) + min(GANG_SIZES) <= gang_accels:
        sizes.append(rng.choice([s for s in GANG_SIZES if sum(sizes) + s <= gang_accels]))
    sizes += [1] * (wanted - sum(sizes))
    rng.shuffle(sizes)
    return [Work(f"gang-{i:05d}" if size > 1 else f"one-{i:06d}", tenants[i % len(tenants)], size)
            for i, size in enumerate(sizes)]


# --- the clients --------------------------------------------------------------------------------

@dataclass
class Times:
    submitted: float = 0.0      # the submit call started
    acknowledged: float = 0.0   # it returned
    committed: float = 0.0      # first seen with every replica placed
    commit_seen_ms: float | None = None  # from that commit (the deployment's updated_at) to seeing it
    commit_at: float = 0.0      # that updated_at (seconds since the epoch, the controller's clock)
    running: float = 0.0
    running_at: float = 0.0     # updated_at when first seen Running: the flush that recorded it
    running_seen_ms: float | None = None  # from that flush to seeing it
    delete_due: float = 0.0     # picked for deletion (seen Running): sent then, or once a deleter is free
    delete_sent: float = 0.0
    delete_answered: float = 0.0
    deleted: float = 0.0


@dataclass
class Run:
    times: dict[str, Times] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    delete_rpc_ms: list[float] = field(default_factory=list)
    deleters: int = 1  # concurrent deleting clients (`deleter`)
    all_running: asyncio.Event = field(default_factory=asyncio.Event)
    newly_running: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    expected: int = 0
    names: frozenset[str] = frozenset()  # the workload's (the preloaded deployments are not watched)
    running: int = 0
    watches: int = 0  # WatchDeployments streams opened (more than one: the controller cut one off)
    # The current state a watch starts with: the preloaded deployments it must list before the
    # first submit (else the submits' events queue behind that list and their delivery is timed).
    preexisting: int = 0
    listed: int = 0  # by the stream open now
    current_listed: asyncio.Event = field(default_factory=asyncio.Event)
    send_late_ms: list[float] = field(default_factory=list)  # open loop: each submit sent this late
    # The bench's own event loop, late by this much every tick from the first submit: when it is
    # small, what the clients and the watch wait for is the controller (and the transport).
    loop_lag_ms: list[float] = field(default_factory=list)
    sending_s: float = 0.0  # open loop: from the first submit sent to the last


async def watch(channel: Any, run: Run) -> None:
    """Timestamps commits, Running and deletions from `WatchDeploymentBatches` (WatchDeployments'
    events several to a message: one event a message, a busy controller streamed ~65 a second at
    4,096 nodes, and a pass's burst waited seconds for the watch), watching again when the
    controller cuts the stream off (a watcher that falls behind is ended UNAVAILABLE; the new
    stream starts with the current state, so a deployment committed or running meanwhile is
    stamped when it is seen)."""
    import grpc
    from maia.v1 import deployments_pb2, deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    while True:
        run.watches += 1
        run.listed = 0
        try:
            async for batch in stub.WatchDeploymentBatches(deployments_pb2.WatchDeploymentsRequest()):
                now = time.perf_counter()
                for event in batch.events:
                    _seen(run, event, now)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                run.errors.append(f"watch: {exc.code().name} {exc.details()}")
                return
        await asyncio.sleep(0.1)


def _seen(run: Run, event: Any, now: float) -> None:
    from maia.v1 import deployments_pb2
    d = event.deployment
    if d.spec.name not in run.names:
        if event.type == deployments_pb2.DeploymentEvent.TYPE_ADDED:
            run.listed += 1
            if run.listed >= run.preexisting:
                run.current_listed.set()
        return
    t = run.times.setdefault(d.spec.name, Times())
    if event.type == deployments_pb2.DeploymentEvent.TYPE_DELETED:
        t.deleted = t.deleted or now
        return
    if not t.committed and d.placed_replicas >= d.spec.replicas:
        t.committed = now
        # updated_at: when the commit that placed the last replica began (a later change only
        # makes it later), on this machine's clock
        t.commit_at = d.updated_at.ToMicroseconds() / 1e6
        t.commit_seen_ms = (time.time() - t.commit_at) * 1000
    if not t.running and d.phase == deployments_pb2.DEPLOYMENT_PHASE_RUNNING:
        t.running = now
        t.running_at = d.updated_at.ToMicroseconds() / 1e6
        t.running_seen_ms = (time.time() - t.running_at) * 1000
        run.newly_running.put_nowait(d.spec.name)
        run.running += 1
        if run.running >= run.expected:
            run.all_running.set()


async def submit_one(stub: Any, work: Work, run: Run) -> None:
    """One SubmitDeployment, timestamped (an error is recorded and the deployment not waited for)."""
    import grpc
    from maia.v1 import deployments_pb2
    t = run.times.setdefault(work.name, Times())
    request = deployments_pb2.SubmitDeploymentRequest(spec=work.spec())
    t.submitted = time.perf_counter()
    try:
        # the send time: the controller observes the call's wait before its handler (maia_grpc_server_queued_seconds)
        await stub.SubmitDeployment(request, timeout=60, metadata=((SENT_AT_METADATA_KEY, f"{time.time():.6f}"),))
    except grpc.aio.AioRpcError as exc:
        _refused(run, f"submit {work.name}: {exc.code().name} {exc.details()}")
        return
    t.acknowledged = time.perf_counter()


async def submit_many(stub: Any, works: list[Work], run: Run) -> None:
    """One SubmitDeployments call of `works`, each timestamped as `submit_one` times its own call
    (submitted and answered with the call); a request the answer refuses is recorded as an error."""
    import grpc
    from google.rpc import code_pb2
    from maia.v1 import deployments_pb2
    request = deployments_pb2.SubmitDeploymentsRequest(
        requests=[deployments_pb2.SubmitDeploymentRequest(spec=work.spec()) for work in works])
    started = time.perf_counter()
    for work in works:
        run.times.setdefault(work.name, Times()).submitted = started
    try:
        answer = await stub.SubmitDeployments(request, timeout=60,
                                              metadata=((SENT_AT_METADATA_KEY, f"{time.time():.6f}"),))
    except grpc.aio.AioRpcError as exc:
        for work in works:
            _refused(run, f"submit {work.name}: {exc.code().name} {exc.details()}")
        return
    answered = time.perf_counter()
    for work, result in zip(works, answer.results, strict=True):
        if result.HasField("error"):
            _refused(run, f"submit {work.name}: {code_pb2.Code.Name(result.error.code)} {result.error.message}")
        else:
            run.times[work.name].acknowledged = answered


def _refused(run: Run, error: str) -> None:
    """A submit refused: recorded, and its deployment not waited for."""
    run.errors.append(error)
    run.expected -= 1
    if run.running >= run.expected:
        run.all_running.set()


async def client(channel: Any, queue: list[Work], run: Run, batch: int = 1) -> None:
    """Closed loop: the next submit once the last was answered. With `batch` K > 1 the next up to
    K single-shard deployments go in one SubmitDeployments call (a gang alone, as before)."""
    from maia.v1 import deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    while queue:
        if batch == 1 or queue[-1].shards > 1:
            await submit_one(stub, queue.pop(), run)
            continue
        works: list[Work] = []
        while queue and len(works) < batch and queue[-1].shards == 1:
            works.append(queue.pop())
        await submit_many(stub, works, run)


def arrival_offsets(count: int, rate: float, poisson: bool, rng: random.Random) -> list[float]:
    """Seconds from the start at which `count` arrivals come, `rate` a second: exponential gaps
    (a Poisson process) or even ones."""
    offsets, at = [], 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate) if poisson else 1.0 / rate
    return offsets


async def open_loop(offsets: Sequence[float], send: Any, late_ms: list[float]) -> float:
    """Call `send(i)` (a coroutine function) as a task of its own at each arrival `offsets[i]`
    (seconds from now), never waiting for an answer; appends how late each was sent (ms) to
    `late_ms`. Returns the seconds from the first send to the last; waits for every call."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    calls: list[asyncio.Task[Any]] = []
    try:
        for i, offset in enumerate(offsets):
            wait = start + offset - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            late_ms.append(max(0.0, loop.time() - start - offset) * 1000)
            calls.append(asyncio.create_task(send(i)))
        sent_s = loop.time() - start
        await asyncio.gather(*calls)
    finally:
        for call in calls:
            call.cancel()
    return sent_s


async def offered(channel: Any, works: list[Work], run: Run, rate: float, poisson: bool, seed: int) -> None:
    """Open loop: every deployment submitted at its arrival time, `rate` a second."""
    from maia.v1 import deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    offsets = arrival_offsets(len(works), rate, poisson, random.Random(seed))
    run.sending_s = await open_loop(offsets, lambda i: submit_one(stub, works[i], run), run.send_late_ms)


async def deleter(channel: Any, run: Run, every: int, deleters: int = 1) -> None:
    """Deletes every `every`-th deployment that starts running, while the submits go on, by
    `deleters` clients: each sends its next delete once the last was answered, so with one there is
    never more than one delete at the controller, with N up to N (those due meanwhile wait here)."""
    due: asyncio.Queue[str] = asyncio.Queue()
    clients = [asyncio.create_task(_delete_each(channel, run, due)) for _ in range(deleters)]
    try:
        seen = 0
        while True:
            name = await run.newly_running.get()
            if not name:  # the run is over
                break
            seen += 1
            if seen % every == 0:
                run.times[name].delete_due = time.perf_counter()
                due.put_nowait(name)
        for _ in clients:
            due.put_nowait("")
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()


async def _delete_each(channel: Any, run: Run, due: asyncio.Queue[str]) -> None:
    """One deleting client: the deployments `due` names, one after another, until an empty name."""
    import grpc
    from maia.v1 import deployments_pb2, deployments_pb2_grpc
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    while True:
        name = await due.get()
        if not name:
            return
        t = run.times[name]
        t.delete_sent = time.perf_counter()
        try:
            await stub.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name=name), timeout=60)
        except grpc.aio.AioRpcError as exc:
            run.errors.append(f"delete {name}: {exc.code().name} {exc.details()}")
            continue
        t.delete_answered = time.perf_counter()
        run.delete_rpc_ms.append((t.delete_answered - t.delete_sent) * 1000)


# --- one run ------------------------------------------------------------------------------------

async def admin_setup(channel: Any, shape: Shape, tenants: Sequence[str] = TENANTS) -> str:
    """Topology and tenants (unless preloaded); returns a node-bootstrap token."""
    from maia.v1 import admin_pb2, admin_pb2_grpc, common_pb2
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    if not shape.preloaded:
        await admin.ApplyTopology(shape.topology())
        for tenant in tenants:
            await admin.CreateTenant(admin_pb2.Tenant(id=tenant, isolation=common_pb2.ISOLATION_SHARED))
    return (await admin.CreateToken(admin_pb2.CreateTokenRequest(role="node-bootstrap"))).secret


async def wait_connected(channel: Any, nodes: int, timeout_s: float,
                         ready_now: list[int] | None = None) -> tuple[float, int]:
    """(seconds, nodes ready): all of them, or as many as made it within `timeout_s`
    (`ready_now[0]`: the last count, for whoever reports progress meanwhile)."""
    import grpc
    from maia.v1 import admin_pb2, admin_pb2_grpc
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    started = time.perf_counter()
    ready = 0
    while time.perf_counter() - started < timeout_s:
        try:
            ready = (await admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=30)).nodes_ready
        except grpc.aio.AioRpcError:  # a controller busy with a join storm: ask again
            pass
        if ready_now is not None:
            ready_now[0] = ready
        if ready >= nodes:
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - started, ready


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


def lag_quantile(bench: Bench, q: float) -> float | None:
    """The event-loop lag below which `q` of the ticks since the submits started fell (a bucket's
    upper bound; None: unknown)."""
    return bucket_quantile(bench.lag, bench.lag_at_start, q)


def bucket_quantile(buckets: dict[float, float], before: dict[float, float], q: float) -> float | None:
    """The upper bound of the histogram bucket `q` of the observations since `before` fell in
    (None: none observed)."""
    counts = sorted((le, n - before.get(le, 0.0)) for le, n in buckets.items())
    total = counts[-1][1] if counts else 0.0
    return next((le for le, n in counts if n >= q * total), None) if total else None


def interpolated_quantile(buckets: dict[float, float], before: dict[float, float], q: float) -> float | None:
    """Prometheus's histogram_quantile: the `q` quantile of the observations since `before`,
    linear within the bucket it falls in (the bucket below +Inf's bound when it falls there;
    None: none observed)."""
    counts = sorted((le, n - before.get(le, 0.0)) for le, n in buckets.items())
    total = counts[-1][1] if counts else 0.0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (n - below) if n > below else 1.0)
        lower, below = le, n
    return lower


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


async def one_run(kind: str, nodes: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One run, summarised; stopped part way (an error, a cancellation: the bench's timeout, ^C,
    SIGTERM) it stops every process it started and prints what it measured so far before the
    error goes on."""
    shape = Shape(nodes, args.fleets or max(1, (nodes + 255) // 256), args.preload)
    bench = Bench(kind, shape, len(tenants_for(shape, args)), gateways=args.agent_gateways,
                  load=f"open loop, {args.rate:g}/s offered ({args.arrivals})" if args.rate > 0
                  else f"closed loop, {args.clients} clients"
                  + (f", up to {args.submit_batch} single-shard deployments a call" if args.submit_batch > 1 else ""))
    progress = asyncio.create_task(report_progress(bench, args.progress_every)) if args.progress_every else None
    try:
        await _measure(bench, args, root)
    except BaseException as exc:
        why = "cancelled (a signal, ^C or a timeout)" if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt) \
            else f"{type(exc).__name__}: {exc}"
        bench.run.errors.append(f"stopped while {bench.stopped_while or bench.phase}: {why}")
        print(report(summarize(bench)), flush=True)
        raise
    finally:
        if progress is not None:
            progress.cancel()
    return summarize(bench)


async def _measure(bench: Bench, args: argparse.Namespace, root: Path) -> None:
    from controller.bearer import aio_channel
    shape, run = bench.shape, bench.run
    tenants = tenants_for(shape, args)
    bin_dir = Path(sys.executable).parent
    bench.phase = "starting the database"
    async with database_server(bench.kind, root, statements=args.pg_statements > 0) as (url, bench.db_server):
        extra: list[str] = []
        if shape.preloaded:
            bench.phase = f"preloading {shape.preloaded} placements"
            t0 = time.perf_counter()
            await preload(url, shape.layout(), placements=shape.preloaded, tenants=tenants)
            bench.preload_s = time.perf_counter() - t0
            # The preloaded nodes count as up from the start: the fleets have this long to join
            # before silence counts against them (they are handed their shards as they do).
            extra = ["--restart-grace", "1800"]
        bench.phase = "starting the controller"
        token_file = root / "admin.token"
        controller = bench.controller = Process("maia-controller", [
            str(bin_dir / "maia-controller"), "--listen", "127.0.0.1:0", "--db", url,
            "--bootstrap-admin-token-file", str(token_file), "--submits-per-minute", "0",
            "--metrics-listen", "127.0.0.1:0", "--log-level", args.controller_log_level, *extra,
            *([] if args.heartbeat_timeout is None else ["--heartbeat-timeout", str(args.heartbeat_timeout)]),
            *([] if args.decide_process is None else
              ["--decide-process" if args.decide_process else "--no-decide-process"]),
            *(["--agent-gateways", str(args.agent_gateways), "--agent-listen", "127.0.0.1:0"] if args.agent_gateways
              else []),
            *([] if args.agent_gateway_linger_ms is None else
              ["--agent-gateway-linger-ms", str(args.agent_gateway_linger_ms)])],
            root / "controller.log")
        fleets: list[Process] = []
        tasks: list[asyncio.Task[Any]] = []
        profiler: Process | None = None
        finished = False
        try:
            address = await asyncio.to_thread(controller.read_line, "maia-controller listening on ", 120)
            agent_address = address
            if args.agent_gateways:  # the fleets connect to the gateways ("HOST:PORT (N gateways)")
                agent_address = (await asyncio.to_thread(controller.read_line, "maia-controller agents on ", 60)
                                 ).split()[0]
            bench.metrics_url = await asyncio.to_thread(controller.read_line, "maia-controller metrics on ", 30)
            channel = aio_channel(address, token_file.read_text().strip())
            node_token = await admin_setup(channel, shape, tenants)
            # One fleet after the other: what is measured is scheduling, not a join storm
            # (--fleets-at-once: all of them together, each starting its nodes --stagger apart).
            expected = 0
            for i, (prefix, racks) in enumerate(shape.fleet_racks()):
                bench.phase = "joining the fleets" if args.fleets_at_once else f"joining fleet {i + 1}/{shape.fleets}"
                fleets.append(Process(f"maia-simnode {i}", [
                    str(bin_dir / "maia-simnode"), "--controller", agent_address, "--racks", str(racks),
                    "--nodes-per-rack", str(NODES_PER_RACK), "--rack-prefix", prefix,
                    "--load-delay", str(args.load_delay), "--state-dir", str(root / f"fleet-{i}"),
                    "--log-level", "WARNING", *(["--shared-channel"] if args.shared_channel else []),
                    *([] if args.stagger is None else ["--stagger", str(args.stagger)])],
                    root / f"simnode-{i}.log", env={"MAIA_TOKEN": node_token}))
                fleets[-1].nicer(args.fleet_nice)
                expected += racks * NODES_PER_RACK
                if not args.fleets_at_once:
                    waited, ready = await wait_connected(channel, expected, timeout_s=args.join_timeout,
                                                         ready_now=bench.ready)
                    bench.joined_s += waited
            if args.fleets_at_once:
                bench.joined_s, ready = await wait_connected(channel, expected, timeout_s=args.join_timeout,
                                                             ready_now=bench.ready)
            bench.works = works = workload(shape, args)
            run.expected, run.names = len(works), frozenset(w.name for w in works)
            run.preexisting = shape.preloaded
            if ready < shape.nodes:  # measured anyway, on the nodes that made it
                run.errors.append(f"only {ready}/{shape.nodes} nodes ready after {bench.joined_s:.0f} s")
            bench.phase = "watching"
            listing = time.perf_counter()
            tasks.append(asyncio.create_task(watch(channel, run)))
            await watch_listed(run, timeout_s=args.join_timeout)
            bench.listed_s = time.perf_counter() - listing
            profiler = _profile(args.py_spy, controller, root) if args.py_spy else None
            await scrape_passes(bench)
            bench.lag_at_start, bench.shard_start_at_start = dict(bench.lag), dict(bench.shard_start)
            bench.beat_rows_at_start = bench.beat_rows
            if bench.db_server is not None:
                if args.pg_statements:
                    await _pg_execute(url, "SELECT pg_stat_statements_reset()")
                bench.db_xacts0 = (await _pg_execute(url, PG_XACTS_SQL))[0][0]
                bench.db_cpu0 = bench.db_server.cpu_s()
            bench.phase = "submitting"
            bench.cpu0, bench.started = controller.cpu_s(), time.perf_counter()
            tasks.append(asyncio.create_task(watch_event_loop(lambda late_s: run.loop_lag_ms.append(late_s * 1000))))
            bench.child_cpu0 = controller.children_cpu_s()
            bench.gateway_cpu0 = controller.children_cpu_s(GATEWAY_MODULE)
            bench.machine0, bench.own0 = machine_cpu_s(), own_cpu_s()
            queue = list(reversed(works))
            if args.delete_every:
                run.deleters = args.deleters
                tasks.append(asyncio.create_task(deleter(channel, run, args.delete_every, args.deleters)))
            if args.rate > 0:
                await offered(channel, works, run, args.rate, args.arrivals == "poisson", args.seed)
            else:
                await asyncio.gather(*(client(channel, queue, run, args.submit_batch) for _ in range(args.clients)))
            bench.submitted_s = time.perf_counter() - bench.started
            bench.phase = "waiting for Running"
            try:
                await asyncio.wait_for(run.all_running.wait(), timeout=args.timeout)
            except TimeoutError:
                run.errors.append(f"not all running after {args.timeout:.0f} s")
            if args.delete_every:
                bench.phase = "waiting for the deletions"
                run.newly_running.put_nowait("")
                await tasks[-1]
                await _settle_deletions(run, timeout_s=60)
            bench.measure()
            if bench.db_server is not None:  # before the controller stops: the run's, not its shutdown's
                bench.db_xacts = (await _pg_execute(url, PG_XACTS_SQL))[0][0] - bench.db_xacts0
                if args.pg_statements:
                    bench.pg_statements = await pg_statements_since_reset(url, args.pg_statements)
            finished = True
            await channel.close()
        finally:
            for task in tasks:
                task.cancel()
            if profiler is not None:
                profiler.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                await asyncio.shield(asyncio.to_thread(profiler.proc.wait, 60))
                profiler.stop()
            # The controller first: nodes stopping before it would be marked down and their
            # shards released, and the committed state graded below would no longer be the run's.
            if not finished:
                bench.stopped_while = bench.phase
                bench.measure()
            await asyncio.shield(scrape_passes(bench))
            bench.phase = "stopping"
            # Waited for past its own shutdown deadline: a stuck stop exits 3 with its stacks logged.
            bench.controller_exit = controller.stop(grace_s=SHUTDOWN_DEADLINE_S + 5.0)
            stop_all(fleets)
        bench.phase = "grading"
        bench.violations = await grade(url)


# The steady rate: deployments that reached Running in the middle of the run, over the time
# between the first and the last of them. The sustained rate (first submit to last Running) also
# holds the pipeline's filling (the first submit's ~1-2 s to Running) and draining, a quarter of a
# run of a few thousand deployments; this one is the rate the pipeline keeps once full.
MIDDLE_SHARE = 0.8


def middle_rate(running_at: list[float], share: float = MIDDLE_SHARE) -> float | None:
    """Deployments a second over the middle `share` of these Running times (None: too few)."""
    times = sorted(running_at)
    skip = round(len(times) * (1 - share) / 2)
    first, last = skip, len(times) - 1 - skip
    if last - first < 1 or times[last] <= times[first]:
        return None
    return (last - first) / (times[last] - times[first])


def _profile(py_spy: str, controller: Process, root: Path) -> Process:
    return Process("py-spy", [py_spy, "record", "--pid", str(controller.proc.pid), "--format", "raw",
                              "--rate", "50", "--nonblocking", "--output", str(root / "controller.pyspy.txt")],
                   root / "py-spy.log")


async def watch_listed(run: Run, timeout_s: float) -> None:
    """Until the watch is established before the first submit: it has listed the deployments
    that exist (the preloaded ones: what a watch starts with), or, with none, half a second."""
    if not run.preexisting:
        await asyncio.sleep(0.5)
        return
    try:
        await asyncio.wait_for(run.current_listed.wait(), timeout=timeout_s)
    except TimeoutError:
        run.errors.append(f"the watch listed {run.listed} of the {run.preexisting} preloaded deployments "
                          f"in {timeout_s:.0f} s")


async def _settle_deletions(run: Run, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if all(t.deleted for t in run.times.values() if t.delete_sent):
            return
        await asyncio.sleep(0.2)
    run.errors.append("deleted deployments still present after the run")


async def grade(url: str) -> list[str]:
    """The checker's verdict on the committed state (the problem as stored, its placements as the plan)."""
    from bench.checking import check_state
    from controller.store.db import Database
    from controller.store.snapshot import load_snapshot
    db = Database(url)
    try:
        async with db.unit_of_work() as uow:
            problem = (await load_snapshot(uow.session)).problem
    finally:
        await db.dispose()
    return [str(v) for v in check_state(problem, problem["placements"])]


def _ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1)}


SLOW_SUBMIT_MS = (20, 50)  # the submits slower than each, counted (the submit p99 target is 20 ms)


def _slow(values: list[float]) -> dict[str, int]:
    return {f"over_{limit}_ms": sum(1 for v in values if v > limit) for limit in SLOW_SUBMIT_MS}


def summarize(bench: Bench) -> dict[str, Any]:
    works, run, shape = bench.works, bench.run, bench.shape
    singles = [w.name for w in works if w.shards == 1]
    gangs = [w.name for w in works if w.shards > 1]
    gangs64 = [w.name for w in works if w.shards == max(GANG_SIZES)]
    t = run.times

    def stage(names: list[str], a: str, b: str) -> list[float]:
        return [(getattr(t[n], b) - getattr(t[n], a)) * 1000 for n in names
                if n in t and getattr(t[n], a) and getattr(t[n], b)]

    def commit_seen(names: list[str]) -> list[float]:
        return [ms for n in names if n in t and (ms := t[n].commit_seen_ms) is not None]

    def recorded(names: list[str]) -> list[float]:  # the commit -> the flush that recorded Running, controller clock
        return [(t[n].running_at - t[n].commit_at) * 1000 for n in names if n in t and t[n].commit_at and t[n].running_at]

    ran = [n for n in (singles + gangs) if n in t and t[n].running]
    span = max(t[n].running for n in ran) - min(t[n].submitted for n in ran) if ran else 0.0
    steady = middle_rate([t[n].running for n in ran])
    violations = bench.violations or []
    return {
        "db": bench.kind, "nodes": shape.nodes, "fleets": shape.fleets, "preloaded": shape.preloaded,
        "preload_s": round(bench.preload_s, 1), "tenants": bench.tenants, "deployments": len(works),
        "singles": len(singles), "gangs": len(gangs), "gang_shards": sum(w.shards for w in works if w.shards > 1),
        "submitted": sum(1 for x in t.values() if x.submitted),
        "deletes": sum(1 for x in t.values() if x.delete_sent), "deleters": run.deleters,
        "submit": _ms(stage(singles + gangs, "submitted", "acknowledged")),
        "submit_slow": _slow(stage(singles + gangs, "submitted", "acknowledged")),
        "single_committed": _ms(stage(singles, "submitted", "committed")),
        "single_running": _ms(stage(singles, "submitted", "running")),
        "gang_committed": _ms(stage(gangs, "submitted", "committed")),
        "gang_running": _ms(stage(gangs, "submitted", "running")),
        "gangs64": len(gangs64), "gang64_committed": _ms(stage(gangs64, "submitted", "committed")),
        # after the submit was answered: the wait for a reconcile pass, and the pass
        "gang64_answered_committed": _ms(stage(gangs64, "acknowledged", "committed")),
        "single_answered_committed": _ms(stage(singles, "acknowledged", "committed")),
        # the controller's commit (the deployment's updated_at) -> the bench's watch saw it: the
        # delivery part of submit -> committed
        "single_commit_seen": _ms(commit_seen(singles)), "gang_commit_seen": _ms(commit_seen(gangs)),
        "watch_listed_s": round(bench.listed_s, 2),
        # committed -> Running, stage by stage: the controller's commit -> its flush recording Running
        # (updated_at to updated_at), that flush -> seen on the watch, and the controller's histograms
        "single_running_recorded": _ms(recorded(singles)),
        "single_running_seen": _ms([ms for n in singles if n in t and (ms := t[n].running_seen_ms) is not None]),
        "shard_start": {stage: {f"p{q}_ms": None if (v := interpolated_quantile(
                                    buckets, bench.shard_start_at_start.get(stage, {}), q / 100)) is None
                                else round(v * 1000, 1) for q in (50, 99)}
                        for stage, buckets in sorted(bench.shard_start.items())},
        "bench_loop_lag": _ms(run.loop_lag_ms),
        "delete_rpc": _ms(run.delete_rpc_ms),
        "delete_gone": _ms(stage(list(t), "delete_sent", "deleted")),
        # from picked to answered: the RPC and the wait for a free deleter (one deleter: every
        # delete due while one is at the controller waits in the bench, which the RPC's time hides)
        "delete_due_answered": _ms(stage(list(t), "delete_due", "delete_answered")),
        "delete_due_gone": _ms(stage(list(t), "delete_due", "deleted")),
        # sent once every submit was answered: to a controller no longer saturated
        "deletes_after_submits": sum(1 for x in t.values()
                                     if x.delete_sent and x.delete_sent > bench.started + bench.submitted_s),
        "running": len(ran),
        "deployments_per_s": round(len(ran) / span, 1) if span else 0.0,
        "steady_per_s": None if steady is None else round(steady, 1),
        "submit_phase_s": round(bench.submitted_s, 2), "elapsed_s": round(bench.elapsed_s, 2),
        "controller_cpu_s": round(bench.cpu_s, 1), "controller_peak_rss_mib": round(bench.rss_mib),
        "controller_children_cpu_s": round(bench.child_cpu_s, 1),
        "controller_gateways_cpu_s": round(bench.gateway_cpu_s, 1), "agent_gateways": bench.gateways,
        "gateways_peak_rss_mib": round(bench.gateway_rss_mib),
        # the whole machine over the same span: the fleets are most of busy - controller - bench
        "machine_busy_cpu_s": round(bench.machine_busy_s, 1), "machine_cpu_s": round(bench.machine_all_s, 1),
        "bench_cpu_s": round(bench.own_cpu_s, 1),
        "db_server_cpu_s": round(bench.db_cpu_s, 2) if bench.db_server is not None else None,
        "db_transactions": bench.db_xacts if bench.db_server is not None else None,
        "pg_statements": bench.pg_statements,
        "heartbeat_rows_per_s": None if (rows := bench.beat_rows_per_s()) is None else round(rows, 1),
        "nodes_joined_s": round(bench.joined_s, 1), "controller_exit": bench.controller_exit,
        "watches": run.watches, "graded": bench.violations is not None, "reconcile_passes": dict(bench.passes),
        "loop_lag_p50_le_s": lag_quantile(bench, 0.5), "loop_lag_p99_le_s": lag_quantile(bench, 0.99),
        # the preloaded bench submits nothing before the submit phase: the histogram is the run's
        "submit_server_p50_le_s": bucket_quantile(bench.submit_rpc, {}, 0.5),
        "submit_server_p99_le_s": bucket_quantile(bench.submit_rpc, {}, 0.99),
        "submit_server": _interpolated_ms(bench.submit_rpc),
        # before the handler ran (the bench's send time in the call's metadata), and by stage inside
        "submit_queued": _interpolated_ms(bench.submit_queued),
        "submit_stages": {stage: _interpolated_ms(buckets) for stage, buckets in bench.submit_stages.items()},
        "load": bench.load,
        "offered_per_s": round(len(run.send_late_ms) / run.sending_s, 1) if run.sending_s else None,
        "send_late": _ms(run.send_late_ms) if run.send_late_ms else None,
        "checker_violations": violations[:10], "checker_violation_count": len(violations),
        "errors": run.errors[:10], "error_count": len(run.errors),
    }


def _interpolated_ms(buckets: dict[float, float]) -> dict[str, float | None]:
    """p50 and p99 (ms) of a histogram's observations (the run's: the bench submits nothing before)."""
    return {f"p{q}_ms": None if (v := interpolated_quantile(buckets, {}, q / 100)) is None else round(v * 1000, 1)
            for q in (50, 99)}


def _stages_line(r: dict[str, Any]) -> str:
    """Where a submit's time went in the controller, p50/p99 ms a stage (empty: not reported)."""
    parts = [f"{stage} {v['p50_ms']:.1f}/{v['p99_ms']:.1f}" for stage, v in r["submit_stages"].items()
             if v["p50_ms"] is not None]
    queued = r["submit_queued"]
    if queued["p50_ms"] is not None:
        parts.insert(0, f"before the handler {queued['p50_ms']:.1f}/{queued['p99_ms']:.1f}")
    return f"\n  submit stages p50/p99 ms (interpolated): {', '.join(parts)}" if parts else ""


def _per_deployment_ms(r: dict[str, Any], key: str) -> float:
    """CPU ms a deployment that ran (0.0: none ran)."""
    return round(r[key] * 1000 / r["running"], 2) if r["running"] else 0.0


def _pg_statements_lines(r: dict[str, Any]) -> str:
    """--pg-statements: the totals and the top statements by the server's execution time."""
    pg = r.get("pg_statements")
    if not pg:
        return ""
    return (f"\n  pg_stat_statements since the first submit: {pg['calls']} calls of {pg['statements']} statements, "
            f"{pg['exec_ms']} ms executing; by time:"
            + "".join(f"\n    {s['exec_ms']:>9.1f} ms {s['calls']:>7} calls {s['rows']:>8} rows  {s['query']}"
                      for s in pg["top"]))


def report(r: dict[str, Any]) -> str:
    def pp(key: str) -> str:
        return f"{r[key]['p50_ms']:.0f}/{r[key]['p99_ms']:.0f}"
    preloaded = (f"{r['preloaded']} placements preloaded in {r['preload_s']} s, " if r["preloaded"] else "")
    checker = (f"{r['checker_violation_count']} violations" if r["graded"] else "not run")
    rewatched = f" (the watch was cut off {r['watches'] - 1} times)" if r["watches"] > 1 else ""
    server = r["submit_server"]
    in_controller = (f"{server['p50_ms']:.1f}/{server['p99_ms']:.1f} ms interpolated, "
                     if server["p50_ms"] is not None else "")
    slow = ", ".join(f"{n} > {limit} ms" for limit in SLOW_SUBMIT_MS
                     if (n := r.get("submit_slow", {}).get(f"over_{limit}_ms")) is not None)
    sent = (f", sent at {r['offered_per_s']}/s, late p50/p99 {pp('send_late')} ms" if r["send_late"] else "")
    return (f"{r['db']:8} {r['nodes']:>6} nodes  {preloaded}{r['submitted']}/{r['deployments']} deployments "
            f"submitted by {r['tenants']} tenants ({r['singles']} single, "
            f"{r['gangs']} gangs = {r['gang_shards']} shards, {r['deletes']} deleted by {r.get('deleters', 1)} "
            f"deleter(s)); {r['load']}{sent}\n"
            f"  submit p50/p99 {pp('submit')} ms ({slow}; in the controller {in_controller}"
            f"<= {r['submit_server_p50_le_s']}/"
            f"{r['submit_server_p99_le_s']} s) | submit->committed single {pp('single_committed')} ms, "
            f"gang {pp('gang_committed')} ms ({r['gangs64']} of 64 shards: {pp('gang64_committed')} ms) | "
            f"answered->committed single {pp('single_answered_committed')} ms, "
            f"64-shard gang {pp('gang64_answered_committed')} ms | "
            f"commit->seen on the watch single {pp('single_commit_seen')} ms, gang {pp('gang_commit_seen')} ms "
            f"(the watch listed {r['preloaded']} existing deployments in {r['watch_listed_s']} s) | "
            f"submit->Running single {pp('single_running')} ms, "
            f"gang {pp('gang_running')} ms{rewatched}\n"
            f"  committed->Running recorded single {pp('single_running_recorded')} ms, ->seen on the watch "
            f"{pp('single_running_seen')} ms | shard start stages p50/p99 ms: "
            + ", ".join(f"{stage} {v['p50_ms']}/{v['p99_ms']}" for stage, v in r["shard_start"].items()) + "\n"
            f"  delete rpc {pp('delete_rpc')} ms (due->answered {pp('delete_due_answered')} ms; "
            f"{r['deletes_after_submits']} sent after the submits), "
            f"delete->gone {pp('delete_gone')} ms (due->gone {pp('delete_due_gone')} ms) | "
            f"{r['deployments_per_s']} deployments/s sustained ({r['running']} running in {r['elapsed_s']} s; "
            f"{r['steady_per_s']}/s steady: the middle {round(MIDDLE_SHARE * 100)} % of them) | "
            f"controller CPU {r['controller_cpu_s']} s (decide process "
            f"{round(r['controller_children_cpu_s'] - r['controller_gateways_cpu_s'], 1)} s"
            + (f", {r['agent_gateways']} agent gateways {r['controller_gateways_cpu_s']} s" if r["agent_gateways"] else "")
            + "), "
            f"peak RSS {r['controller_peak_rss_mib']} MiB (the controller's process, not the decide process"
            + (f"; the gateways {r['gateways_peak_rss_mib']} MiB" if r["agent_gateways"] else "") + ") | "
            f"machine busy {r['machine_busy_cpu_s']} of {r['machine_cpu_s']} CPU s (this bench "
            f"{r['bench_cpu_s']} s; the fleets and anything else most of the rest) | "
            + (f"database server CPU {r['db_server_cpu_s']} s, {_per_deployment_ms(r, 'db_server_cpu_s')} ms a "
               f"deployment ({r['db_transactions']} transactions) | " if r.get("db_server_cpu_s") is not None else "")
            + f"controller CPU {_per_deployment_ms(r, 'controller_cpu_s')} ms a deployment | "
            f"heartbeat node-row writes {r['heartbeat_rows_per_s']}/s since the submits began | "
            f"nodes joined in {r['nodes_joined_s']} s | reconcile passes "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['reconcile_passes'].items())) or '?'} | "
            f"event-loop lag p50/p99 <= {r['loop_lag_p50_le_s']}/{r['loop_lag_p99_le_s']} s "
            f"(the bench's own {pp('bench_loop_lag')} ms)"
            f"{_stages_line(r)}{_pg_statements_lines(r)}\n"
            f"  checker: {checker}; errors: {r['error_count']}"
            + "".join(f"\n    {e}" for e in r["errors"] + r["checker_violations"]))


async def _run(args: argparse.Namespace) -> int:
    # SIGTERM (a `timeout` around the bench, a CI job cancelled) stops it as ^C does: the run in
    # progress is cancelled, stops what it started (controller, fleets, PostgreSQL) and reports.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    if not 1 <= args.submit_batch <= limits.SUBMITS_PER_CALL_MAX or (args.submit_batch > 1 and args.rate > 0):
        print(f"error: --submit-batch takes K from 1 to {limits.SUBMITS_PER_CALL_MAX} (the controller refuses a "
              f"larger call), and K > 1 only in a closed loop (not with --rate)", file=sys.stderr)
        return 2
    results = []
    for nodes in args.nodes:
        if nodes % NODES_PER_RACK:
            print(f"error: --nodes {nodes} is not a multiple of {NODES_PER_RACK}", file=sys.stderr)
            return 2
        for kind in args.db:
            root = Path(tempfile.mkdtemp(prefix=f"maia-bench-e2e-{kind}-{nodes}-"))
            try:
                result = await one_run(kind, nodes, args, root)
            finally:
                if args.keep or args.py_spy:
                    print(f"  logs in {root}", flush=True)
                else:
                    subprocess.run(["rm", "-rf", str(root)], check=False)
            results.append(result)
            print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = any(r["checker_violation_count"] or r["error_count"] for r in results)
    return 1 if bad else 0


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("stopped: everything this run started has been stopped", file=sys.stderr)
        return 130
