"""Join storm: a real `maia-controller` (SQLite, or PostgreSQL with `--db postgres`) and real
`maia-simnode` fleets that all start at once, then stay.

For each size in `--nodes` a fresh controller and database: the topology and a node-bootstrap
token are set up, every fleet is started together (each starts its nodes `--stagger` apart), and
the run measures
- the time until every node is registered, connected and ready (`GetClusterSummary`, polled);
- Register latency p50/p99 as the agents saw it (the Registers that succeeded), and the Registers
  that failed, by status code (RESOURCE_EXHAUSTED/UNAVAILABLE: refused with a retry time;
  DEADLINE_EXCEEDED: timed out), from the fleets' control sockets;
- the controller's admission counters from its `/metrics` (admitted, refused by reason,
  abandoned in the queue, answered late by a stalled event loop);
- controller CPU and peak RSS (VmHWM, /proc) over the join; then the steady state: the nodes
  heartbeat for `--steady` seconds (longer than the heartbeat timeout, so a node whose heartbeats
  did not arrive would be suspect by the end) and the controller's CPU share over that window,
  and whether every node is still ready after it;
- how long the controller took to stop after SIGTERM with every node connected
  (`controller_stop_s`) and its exit code (`controller_exit`: 0 clean, 3 its own shutdown deadline
  passed, -9 killed by this benchmark after that deadline and a margin).

    python -m bench join --nodes 4096 16384
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.e2e import NODES_PER_RACK, Process, Shape, _profile, admin_setup, database, run_until_interrupted, stop_all
from bench.fgd import percentile
from bench.nodedeath import FleetProcess, start_fleet
from controller.main import SHUTDOWN_DEADLINE_S


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, nargs="+", default=[4096], help="simulated nodes (multiples of 16), one run each")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="postgres",
                   help="the controller's database: a SQLite file, or a throwaway PostgreSQL (bench/pgserver.py)")
    p.add_argument("--nodes-per-fleet", type=int, default=512, help="simulated nodes per maia-simnode process")
    p.add_argument("--stagger", type=float, default=0.01, help="seconds between one node's start and the next in a fleet")
    p.add_argument("--shared-channel", action="store_true",
                   help="each fleet multiplexes its nodes on one connection (maia-simnode --shared-channel): "
                        "cheap enough for 16,384 nodes on a small machine, but the controller holds few connections")
    p.add_argument("--fleet-nice", type=int, default=5,
                   help="run the fleets this much nicer than the controller: they stand for other machines, and "
                        "at 16,384 nodes on 2 cores 32 fleets at its priority took most of its CPU")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="the controller's --heartbeat-timeout (agents heartbeat every third of it; default: its own)")
    p.add_argument("--heartbeat-interval", type=float, default=None, metavar="SECONDS",
                   help="the fleets' maia-simnode --heartbeat-interval (default: what the controller tells them, a "
                        "third of its heartbeat timeout): the controller's CPU per heartbeat message")
    p.add_argument("--controller-flags", default="", help="more flags for maia-controller, as one string")
    p.add_argument("--steady", type=float, default=60.0, help="seconds of steady state measured after the join")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on the join after this")
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, SQLite file)")
    p.add_argument("--py-spy", metavar="PATH",
                   help="profile the controller during the join with this py-spy binary: collapsed stacks in "
                        "<run dir>/controller.pyspy.txt (implies --keep)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--count-sql", action="store_true",
                   help="count the controller's SQL statements by kind (bench/sqlcount.py): the work per node "
                        "joined, which a loaded machine does not change as it changes seconds")
    p.add_argument("--controller-src", metavar="DIR",
                   help="run the controller from this checkout (e.g. a `git worktree` of an older commit; the "
                        "fleets and this benchmark stay this checkout's): compares the controller's work alone")


_ADMISSION = re.compile(r"maia_agent_admission_(admitted_total|refused_total|abandoned_total|late_total)(\{[^}]*\})? (\S+)")
_AGENT_CALLS = re.compile(r'maia_grpc_server_handled_total\{[^}]*method="(Register|Connect)"[^}]*\} (\S+)')
_AGENT_CODE = re.compile(r'code="(\w+)"')
_PASSES = re.compile(r'maia_reconcile_passes_total\{path="(\w+)"\} (\S+)')
_SHED = re.compile(r'maia_grpc_server_shed_total\{[^}]*method="(\w+)"[^}]*\} (\S+)')


def _metrics(metrics_url: str) -> str:
    with urllib.request.urlopen(metrics_url, timeout=30) as reply:
        return reply.read().decode()


def scrape_admission(metrics_url: str) -> dict[str, float]:
    """The controller's `maia_agent_admission_*` counters (name{labels} -> value)."""
    found: dict[str, float] = {}
    for line in _metrics(metrics_url).splitlines():
        m = _ADMISSION.match(line)
        if m:
            found[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return found


def scrape_work(metrics_url: str) -> dict[str, Any]:
    """What the controller did, counted: agent calls answered by method and status code (the
    calls shed before the interceptor chain included), reconcile passes by path."""
    calls: dict[str, int] = {}
    passes: dict[str, int] = {}
    for line in _metrics(metrics_url).splitlines():
        if m := _AGENT_CALLS.match(line):
            code = _AGENT_CODE.search(line)
            key = f"{m.group(1)} {code.group(1) if code else '?'}"
            calls[key] = calls.get(key, 0) + int(float(m.group(2)))
        elif m := _PASSES.match(line):
            passes[m.group(1)] = int(float(m.group(2)))
        elif m := _SHED.match(line):
            calls[f"{m.group(1)} shed"] = int(float(m.group(2)))
    return {"agent_calls": dict(sorted(calls.items())), "reconcile_passes": passes}


async def nodes_ready(admin: Any) -> int:
    import grpc
    from maia.v1 import admin_pb2
    try:
        return (await admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest(), timeout=30)).nodes_ready
    except grpc.aio.AioRpcError:  # a controller busy with the storm: ask again
        return -1


async def fleet_status(fleets: list[FleetProcess]) -> dict[str, Any]:
    answers = await asyncio.gather(*(f.ask({"op": "status"}) for f in fleets))
    failures: dict[str, int] = {}
    for a in answers:
        for code, n in a.get("register_failures", {}).items():
            failures[code] = failures.get(code, 0) + n
    latencies = [ms for a in answers for ms in a.get("register_ms", [])]
    return {"connected": sum(a["connected"] for a in answers), "heartbeats_sent": sum(a["heartbeats_sent"] for a in answers),
            "register_ok": len(latencies), "register_failures": failures,
            "register_p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
            "register_p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
            "register_max_ms": round(max(latencies), 1) if latencies else None}


def load() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


async def one_run(nodes: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from controller.bearer import aio_channel
    from maia.v1 import admin_pb2_grpc
    shape = Shape(nodes, max(1, (nodes + args.nodes_per_fleet - 1) // args.nodes_per_fleet))
    bin_dir = Path(sys.executable).parent
    flags = args.controller_flags.split()
    if args.heartbeat_timeout is not None:
        flags += ["--heartbeat-timeout", str(args.heartbeat_timeout)]
    env: dict[str, str] = {}
    sql_counts = root / "sql-counts.json"
    if args.count_sql:
        from bench.sqlcount import ENV_PATH, sitecustomize_source
        (root / "site").mkdir()
        (root / "site" / "sitecustomize.py").write_text(sitecustomize_source())
        env[ENV_PATH] = str(sql_counts)
    paths = [str(root / "site")] if args.count_sql else []
    if args.controller_src:
        src = Path(args.controller_src).resolve()
        paths += [str(src), str(src / "proto")]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    async with database(args.db, root) as url:
        token_file = root / "admin.token"
        controller = Process("maia-controller", [
            str(bin_dir / "maia-controller"), "--listen", "127.0.0.1:0", "--db", url, "--metrics-listen", "127.0.0.1:0",
            "--bootstrap-admin-token-file", str(token_file), "--log-level", "WARNING", *flags], root / "controller.log",
            env=env)
        fleets: list[FleetProcess] = []
        result: dict[str, Any] = {"nodes": nodes, "fleets": shape.fleets, "db": args.db, "controller_flags": flags,
                                  "stagger_s": args.stagger, "shared_channel": args.shared_channel,
                                  "fleet_nice": args.fleet_nice, "controller_src": args.controller_src,
                                  "load_at_start": load()}
        try:
            address = await asyncio.to_thread(controller.read_line, "maia-controller listening on ", 120)
            metrics_url = await asyncio.to_thread(controller.read_line, "maia-controller metrics on ", 30)
            channel = aio_channel(address, token_file.read_text().strip())
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            node_token = await admin_setup(channel, shape)
            profiler = _profile(args.py_spy, controller, root) if args.py_spy else None
            if args.count_sql:  # the counts written after the start's statements (migrations, setup)
                await asyncio.sleep(SQL_DUMP_WAIT_S)
            sql0, work0 = read_sql(sql_counts), scrape_work(metrics_url)
            cpu0, started = controller.cpu_s(), time.perf_counter()
            fleet_flags = ["--stagger", str(args.stagger), *(["--shared-channel"] if args.shared_channel else []),
                           *(["--heartbeat-interval", str(args.heartbeat_interval)] if args.heartbeat_interval else [])]
            fleets = [start_fleet(i, prefix, racks, address, node_token, root, fleet_flags)
                      for i, (prefix, racks) in enumerate(shape.fleet_racks())]
            for fleet in fleets:
                fleet.process.nicer(args.fleet_nice)
            ready, progress = 0, []
            while time.perf_counter() - started < args.timeout:
                await asyncio.sleep(1.0)
                ready = max(ready, await nodes_ready(admin))
                progress.append((round(time.perf_counter() - started), ready))
                if len(progress) % 30 == 0:
                    print(f"  {nodes} nodes: {ready} ready after {progress[-1][0]} s", file=sys.stderr, flush=True)
                if ready >= nodes:
                    break
            joined_s = time.perf_counter() - started
            join_cpu = controller.cpu_s() - cpu0
            if profiler is not None:
                profiler.proc.send_signal(signal.SIGINT)  # py-spy writes what it recorded
                try:
                    await asyncio.to_thread(profiler.proc.wait, 60)
                except subprocess.TimeoutExpired:  # a profiler stuck on a starved machine must not end the run
                    profiler.proc.kill()
            result.update({"all_ready": ready >= nodes, "ready": ready, "joined_s": round(joined_s, 1),
                           "ready_by_minute": progress[59::60], "join_cpu_s": round(join_cpu, 1),
                           "join_cpu_share": round(join_cpu / joined_s, 2), "load_after_join": load()})
            result["agents_at_join"] = await fleet_status(fleets)
            result["admission_at_join"] = scrape_admission(metrics_url)
            if args.count_sql:  # the join's last statements written
                await asyncio.sleep(SQL_DUMP_WAIT_S)
            result["work_at_join"] = work_per_node(
                scrape_work(metrics_url), work0, read_sql(sql_counts), sql0, join_cpu, max(ready, 1), args.count_sql)
            cpu1, t1 = controller.cpu_s(), time.perf_counter()
            beats0 = result["agents_at_join"]["heartbeats_sent"]
            sql1 = read_sql(sql_counts) if args.count_sql else {}
            await asyncio.sleep(args.steady)
            steady_s = time.perf_counter() - t1
            after = await fleet_status(fleets)
            if args.count_sql:  # the steady state's statements written
                await asyncio.sleep(SQL_DUMP_WAIT_S)
                result["steady_sql_rows_per_s"] = steady_rows_per_s(read_sql(sql_counts), sql1, steady_s)
            result.update({
                "steady_s": round(steady_s, 1), "steady_cpu_share": round((controller.cpu_s() - cpu1) / steady_s, 3),
                "steady_heartbeats_per_s": round((after["heartbeats_sent"] - beats0) / steady_s),
                "ready_after_steady": await nodes_ready(admin), "agents_after_steady": after,
                "controller_peak_rss_mib": round(controller.peak_rss_mib()), "load_at_end": load(),
                "admission_at_end": scrape_admission(metrics_url)})
            await channel.close()
        finally:
            # First: nodes stopping before it would be marked suspect. Waited for longer than its own
            # shutdown deadline: a stuck stop then exits EXIT_STUCK with its threads' stacks in the log.
            stopping = time.perf_counter()
            result["controller_exit"] = controller.stop(grace_s=SHUTDOWN_DEADLINE_S + STOP_MARGIN_S)
            result["controller_stop_s"] = round(time.perf_counter() - stopping, 1)
            stop_all([fleet.process for fleet in fleets])
    return result


SQL_DUMP_WAIT_S = 2.5  # longer than bench.sqlcount.DUMP_EVERY_S
STOP_MARGIN_S = 5.0  # waited for the controller past its own shutdown deadline


def read_sql(path: Path) -> dict[str, Any]:
    from bench.sqlcount import read
    return read(path)


def steady_rows_per_s(sql: dict[str, Any], sql0: dict[str, Any], seconds: float) -> dict[str, float]:
    """SQL rows (an executemany's parameter sets each) a second over the steady state, by kind, the
    busiest first (`UPDATE nodes`: the heartbeats written)."""
    rows = {k: (v - sql0.get("rows", {}).get(k, 0)) / seconds for k, v in sql.get("rows", {}).items()}
    return {k: round(v, 1) for k, v in sorted(rows.items(), key=lambda kv: -kv[1]) if v > 0}


def work_per_node(work: dict[str, Any], work0: dict[str, Any], sql: dict[str, Any], sql0: dict[str, Any],
                  cpu_s: float, ready: int, counted_sql: bool) -> dict[str, Any]:
    """The join's work, in total and per node ready: agent calls answered (by method and code),
    reconcile passes, controller CPU, and with `--count-sql` the SQL statements (by kind)."""
    from bench.sqlcount import difference
    calls = {k: v - work0["agent_calls"].get(k, 0) for k, v in work["agent_calls"].items()}
    passes = {k: v - work0["reconcile_passes"].get(k, 0) for k, v in work["reconcile_passes"].items()}
    out: dict[str, Any] = {
        "agent_calls": calls, "agent_calls_per_node": round(sum(calls.values()) / ready, 2),
        "reconcile_passes": passes, "cpu_ms_per_node": round(cpu_s * 1000 / ready, 1)}
    if counted_sql:
        d = difference(sql, sql0)
        out.update({"sql_statements": d["total_executions"],
                    "sql_per_node": round(d["total_executions"] / ready, 1),
                    "sql_top": dict(list(d["executions"].items())[:15])})
    return out


def report(r: dict[str, Any]) -> str:
    a = r.get("agents_at_join", {})
    return (f"{r['db']} {r['nodes']} nodes ({r['fleets']} fleets): "
            f"{'all' if r.get('all_ready') else r.get('ready')} ready in {r.get('joined_s')} s; Register p50/p99 "
            f"{a.get('register_p50_ms')}/{a.get('register_p99_ms')} ms, failed {a.get('register_failures')}; "
            f"admission {r.get('admission_at_join')}; controller CPU {r.get('join_cpu_s')} s over the join "
            f"({r.get('join_cpu_share')} of a core), steady {r.get('steady_cpu_share')} of a core at "
            f"{r.get('steady_heartbeats_per_s')} heartbeats/s, {r.get('ready_after_steady')} ready after "
            f"{r.get('steady_s')} s, SQL rows/s {r.get('steady_sql_rows_per_s')}; peak RSS {r.get('controller_peak_rss_mib')} MiB; load {r.get('load_at_start')} -> "
            f"{r.get('load_at_end')}; work {r.get('work_at_join')}")


async def _run(args: argparse.Namespace) -> int:
    # SIGTERM (a `timeout` around the bench) stops it as ^C does: the run in progress is
    # cancelled and stops what it started (controller, fleets, PostgreSQL).
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    bad = [n for n in args.nodes if n % NODES_PER_RACK or n < NODES_PER_RACK]
    if bad:
        print(f"error: --nodes {bad} are not positive multiples of {NODES_PER_RACK}", file=sys.stderr)
        return 2
    results = []
    for nodes in args.nodes:
        root = Path(tempfile.mkdtemp(prefix=f"maia-bench-join-{nodes}-"))
        try:
            results.append(await one_run(nodes, args, root))
        finally:
            if args.keep or args.py_spy:
                print(f"logs in {root}", file=sys.stderr)
            else:
                subprocess.run(["rm", "-rf", str(root)], check=False)
        print(report(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("all_ready") and r.get("ready_after_steady") == r["nodes"] for r in results) else 1


def main(args: argparse.Namespace) -> int:
    return run_until_interrupted(_run(args))
