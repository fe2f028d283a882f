"""The controller's CPU per submit and per delete RPC, counted apart from its clients'.

A controller in this process (`ControllerApp`: real gRPC on 127.0.0.1, the production interceptor
chain with authentication and auditing, the submit and delete group commits) over a SQLite file
preloaded with a small cluster, its reconcile loop stopped (the RPCs alone: no placing). The
clients run in a child process, so what this process spends is the controller's alone: N
submits by `--clients` concurrent closed-loop clients, then the N deletions of what they
submitted. For each phase: this process's CPU time (`time.process_time`: every thread, gRPC's
and SQLite's included) per call and its event loop's thread's alone (`time.thread_time`: what
the writer's turns wait for), the SQL statements it sent per call, wall time and the calls'
latency. Counts are steadier than latencies on a shared machine: compare builds back to back.

    python -m bench unary --submits 2000 --clients 32 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.fgd import percentile
from bench.preload import Layout, preload
from bench.selfprofile import recording

NODES_PER_RACK = 16
TENANTS = 8
ANSWER_LINE_MAX = 16 * 1024 * 1024  # the child's answer: a JSON line with every call's latency


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1024, help="preloaded nodes (a multiple of 16)")
    p.add_argument("--placements", type=int, default=1000, help="preloaded running single-shard deployments")
    p.add_argument("--submits", type=int, default=2000, help="deployments submitted, then deleted, per run")
    p.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients (one channel)")
    p.add_argument("--warmup", type=int, default=200, help="submits first, not counted")
    p.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh database")
    p.add_argument("--py-spy", metavar="PATH", help="record this process with py-spy during the measured calls "
                                                   "(collapsed stacks: unary-PHASE.pyspy.txt in the current directory)")


def _work(args: argparse.Namespace) -> dict[str, Any]:
    tenants = [f"lab-{i}" for i in range(TENANTS)]
    names = [(f"sub-{i:06d}", tenants[i % TENANTS]) for i in range(args.warmup + args.submits)]
    return {"tenants": tenants, "warmup": names[:args.warmup], "measured": names[args.warmup:],
            "clients": args.clients}


async def one_run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from sqlalchemy import event

    from controller.api.server import ControllerApp
    from controller.config import Config
    work = _work(args)
    url = f"sqlite+aiosqlite:///{root / 'maia.db'}"
    await preload(url, Layout((("rack-", args.nodes // NODES_PER_RACK),), NODES_PER_RACK),
                  placements=args.placements, tenants=work["tenants"], nodes_up=True)
    config = replace(Config(), listen="127.0.0.1:0", db_url=url, submits_per_minute=0,
                     bootstrap_admin_token_file=str(root / "admin.token"),
                     restart_grace_s=3600.0, heartbeat_timeout_s=3600.0)
    app = ControllerApp(config)
    address = await app.start()
    statements = 0

    def counted(*_: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(app.db.engine.sync_engine, "before_cursor_execute", counted)
    work_file = root / "work.json"  # a file: the names of a long run are beyond one argument's limit (128 KiB)
    work_file.write_text(json.dumps(work))
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys, bench.unary as u; u.client_main(sys.argv[1:])", address,
        (root / "admin.token").read_text().strip(), str(work_file),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=ANSWER_LINE_MAX)
    phases: dict[str, Any] = {}
    try:
        for task in app._tasks:  # bench only: the reconcile loop stopped, the rest of the controller as is
            if task.get_name() == "reconciler":
                task.cancel()
        assert client.stdin is not None and client.stdout is not None
        await client.stdout.readline()  # warmed up
        for phase in ("submit", "delete"):
            async with recording(args.py_spy, Path(f"unary-{phase}.pyspy.txt"), rate_hz=200):
                cpu0, statements0, wall0 = time.process_time(), statements, time.perf_counter()
                loop0 = time.thread_time()  # this thread runs the controller's event loop
                client.stdin.write(b"go\n")
                await client.stdin.drain()
                done = json.loads(await client.stdout.readline())
            calls = len(done["latencies_ms"])
            phases[phase] = {
                "calls": calls, "errors": done["errors"],
                "cpu_ms_per_call": (time.process_time() - cpu0) * 1000 / max(calls, 1),
                "loop_cpu_ms_per_call": (time.thread_time() - loop0) * 1000 / max(calls, 1),
                "statements_per_call": (statements - statements0) / max(calls, 1),
                "per_s": calls / (time.perf_counter() - wall0),
                "p50_ms": percentile(done["latencies_ms"], 50), "p99_ms": percentile(done["latencies_ms"], 99)}
        await client.wait()
    finally:
        if client.returncode is None:
            client.kill()
        event.remove(app.db.engine.sync_engine, "before_cursor_execute", counted)
        await app.stop(grace_s=1.0)
    return phases


def client_main(argv: list[str]) -> None:
    """The child process: warm-up submits, then on each `go` line from the parent, the measured
    submits, then their deletions; one JSON line back after each."""
    address, token, work = argv[0], argv[1], json.loads(Path(argv[2]).read_text())
    asyncio.run(_clients(address, token, work))


async def _clients(address: str, token: str, work: dict[str, Any]) -> None:
    import grpc

    from controller.bearer import aio_channel
    from maia.v1 import common_pb2, deployments_pb2, deployments_pb2_grpc
    channel = aio_channel(address, token)
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)

    def submit(name: str, tenant: str) -> Any:
        spec = deployments_pb2.DeploymentSpec(
            name=name, tenant=tenant, replicas=1, shards_per_replica=1, locality=common_pb2.DOMAIN_NODE,
            shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=16, power_w=300))
        return stub.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=spec), timeout=60)

    def delete(name: str, tenant: str) -> Any:
        return stub.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name=name, tenant=tenant), timeout=60)

    async def run(call: Any, names: list[list[str]]) -> dict[str, Any]:
        queue = list(reversed(names))
        latencies: list[float] = []
        errors: list[str] = []

        async def client() -> None:
            while queue:
                name, tenant = queue.pop()
                started = time.perf_counter()
                try:
                    await call(name, tenant)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{name}: {exc.code().name} {exc.details()}")
                    continue
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(work["clients"])))
        return {"latencies_ms": latencies, "errors": errors[:5]}

    await run(submit, work["warmup"])
    print("ready", flush=True)
    for call in (submit, delete):
        await asyncio.to_thread(sys.stdin.readline)
        print(json.dumps(await run(call, work["measured"])), flush=True)
    await channel.close()


def report(runs: list[dict[str, Any]]) -> str:
    lines = []
    for phase in ("submit", "delete"):
        cpu = [r[phase]["cpu_ms_per_call"] for r in runs]
        loop = [r[phase]["loop_cpu_ms_per_call"] for r in runs]
        lines.append(
            f"{phase:6}: CPU {statistics.median(cpu):.3f} ms/call (runs: {', '.join(f'{c:.3f}' for c in cpu)}), "
            f"event loop's thread {statistics.median(loop):.3f} (runs: {', '.join(f'{c:.3f}' for c in loop)}) | "
            f"SQL {statistics.median(r[phase]['statements_per_call'] for r in runs):.3f} statements/call | "
            f"{statistics.median(r[phase]['per_s'] for r in runs):.0f}/s | "
            f"p50 {statistics.median(r[phase]['p50_ms'] for r in runs):.1f} ms, "
            f"p99 {statistics.median(r[phase]['p99_ms'] for r in runs):.1f} ms | "
            f"errors: {sum(len(r[phase]['errors']) for r in runs)}"
            + "".join(f"\n    {e}" for r in runs for e in r[phase]["errors"]))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.nodes % NODES_PER_RACK:
        print(f"error: --nodes {args.nodes} is not a multiple of {NODES_PER_RACK}", file=sys.stderr)
        return 2
    runs = []
    for _ in range(args.repeat):
        root = Path(tempfile.mkdtemp(prefix="maia-bench-unary-"))
        try:
            runs.append(asyncio.run(one_run(args, root)))
        finally:
            subprocess.run(["rm", "-rf", str(root)], check=False)
    print(report(runs), flush=True)
    return 1 if any(r[p]["errors"] for r in runs for p in ("submit", "delete")) else 0
