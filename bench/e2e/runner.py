"""The run, from start to end: `main` runs one per node count and database, each starting the
database, the controller and the fleets, setting up the cluster, watching, offering the load,
waiting for Running and the deletions, stopping everything it started (also when stopped part
way: an error, ^C, SIGTERM) and grading; then the reports and the JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.calibrate import calibrate
from bench.e2e.cluster import NODES_PER_RACK, Shape, admin_setup, tenants_for, wait_connected, workload
from bench.e2e.databases import PG_XACTS_SQL, _pg_execute, database_server, grade, pg_statements_since_reset
from bench.e2e.load import client, deleter, offered
from bench.e2e.measuring import Bench, report_progress, scrape_passes
from bench.e2e.processes import (
    GATEWAY_MODULE, Process, _profile, confine_others, confine_self, machine_cpu_s, misplaced, own_cpu_s,
    run_until_interrupted, stop_all,
)
from bench.e2e.reporting import report
from bench.e2e.summary import summarize
from bench.e2e.watching import _settle_deletions, watch, watch_listed
from bench.preload import preload
from controller import limits
from controller.main import SHUTDOWN_DEADLINE_S
from controller.observability.loop import watch_event_loop


async def one_run(kind: str, nodes: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One run, summarised; stopped part way (an error, a cancellation: the bench's timeout, ^C,
    SIGTERM) it stops every process it started and prints what it measured so far before the
    error goes on."""
    shape = Shape(nodes, args.fleets or max(1, (nodes + 255) // 256), args.preload)
    bench = Bench(kind, shape, len(tenants_for(shape, args)), gateways=args.agent_gateways,
                  others_cpus=args.others_cpus,
                  load=f"open loop, {args.rate:g}/s offered ({args.arrivals})" if args.rate > 0
                  else f"closed loop, {args.clients} clients"
                  + (f", up to {args.submit_batch} single-shard deployments a call" if args.submit_batch > 1 else ""))
    progress = asyncio.create_task(report_progress(bench, args.progress_every)) if args.progress_every else None
    try:
        bench.calibration_ms.append((await asyncio.to_thread(calibrate)).best_ms)
        await _measure(bench, args, root)
        bench.calibration_ms.append((await asyncio.to_thread(calibrate)).best_ms)
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
        own_cpus = frozenset(os.sched_getaffinity(0))
        try:
            if args.others_cpus:  # from now on: the controller started, the fleets not yet
                confine_others(args.others_cpus, bench.db_server)
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
            if args.others_cpus:  # as asked, or the run says so
                run.errors += misplaced(args.others_cpus, fleets, bench.db_server, controller)
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
            if args.others_cpus:  # the next run's controller starts from this process again
                confine_self(own_cpus)
        bench.phase = "grading"
        bench.violations = await grade(url)


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
    return run_until_interrupted(_run(args))
