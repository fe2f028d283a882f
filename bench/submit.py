"""The submit RPC alone, at scale: its latency, and where its time goes.

A controller in this process (real gRPC on 127.0.0.1, authentication and auditing on, as
`maia-controller` runs) over a database preloaded with a cluster and its running work
(`bench.preload`: 4,096 nodes holding 10,000 placements by default), and N concurrent
clients each submitting single-shard, node-local deployments as fast as they are answered.
With `--no-reconciler` the reconcile loop is stopped (the submit path alone); without it, the
loop places what arrives while the submits go on (the load the submit path really meets).
No agents are connected: the preloaded nodes stay up through the controller's restart grace.

    python -m bench submit --nodes 4096 --placements 10000 --submits 2000 --clients 16 --db sqlite
    python -m bench submit ... --rate 100   # open loop: Poisson arrivals at 100/s (bench e2e --rate)
    python -m bench submit ... --py-spy /path/to/py-spy   # collapsed stacks of this process

Clients run in the controller's event loop (one process): their cost is in the latency
measured, which so errs on the high side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.e2e import arrival_offsets, database, open_loop
from bench.fgd import percentile
from bench.preload import Layout, preload
from bench.selfprofile import recording

NODES_PER_RACK = 16
SUBMITS_PER_TENANT = 400


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4096, help="preloaded nodes (a multiple of 16)")
    p.add_argument("--placements", type=int, default=10_000, help="preloaded running single-shard deployments")
    p.add_argument("--submits", type=int, default=2000, help="deployments submitted during the run")
    p.add_argument("--clients", type=int, default=16, help="concurrent gRPC clients (closed loop)")
    p.add_argument("--rate", type=float, default=0.0, metavar="PER_S",
                   help="open loop instead: submits offered at this rate (Poisson arrivals), whatever the answers "
                        "(bench e2e --rate); 0: closed loop (--clients). The warm-up is closed loop")
    p.add_argument("--warmup", type=int, default=64,
                   help="submits first, not measured (the controller's first reads of the cluster)")
    p.add_argument("--db", nargs="+", choices=["sqlite", "postgres"], default=["sqlite"])
    p.add_argument("--no-reconciler", action="store_true", help="stop the reconcile loop: the submit path alone")
    p.add_argument("--request-ids", action="store_true", help="send a client request id with every submit "
                                                              "(as maiactl apply does)")
    p.add_argument("--py-spy", metavar="PATH", help="record this process with py-spy during the submits")
    p.add_argument("--json", help="also write the results to this file")


async def _submits(address: str, token: str, works: list[tuple[str, str]], clients: int,
                   request_ids: bool, rate: float = 0.0) -> tuple[list[float], list[str], float, list[float]]:
    """(latencies ms, errors, seconds, how late each open-loop submit was sent in ms): `clients`
    closed-loop clients, or (`rate` > 0) Poisson arrivals at that rate."""
    import grpc
    from controller.bearer import aio_channel
    from maia.v1 import common_pb2, deployments_pb2, deployments_pb2_grpc
    channel = aio_channel(address, token)
    stub = deployments_pb2_grpc.DeploymentServiceStub(channel)
    latencies: list[float] = []
    errors: list[str] = []
    queue = list(reversed(works))
    late_ms: list[float] = []

    async def submit(name: str, tenant: str) -> None:
        spec = deployments_pb2.DeploymentSpec(
            name=name, tenant=tenant, replicas=1, shards_per_replica=1, locality=common_pb2.DOMAIN_NODE,
            shard=common_pb2.ShardSpec(accelerators=1, hbm_gib=16, power_w=300))
        started = time.perf_counter()
        try:
            await stub.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
                spec=spec, client_request_id=f"req-{name}" if request_ids else ""), timeout=60)
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{name}: {exc.code().name} {exc.details()}")
            return
        latencies.append((time.perf_counter() - started) * 1000)

    async def client() -> None:
        while queue:
            await submit(*queue.pop())

    started = time.perf_counter()
    if rate > 0:
        offsets = arrival_offsets(len(works), rate, True, random.Random(len(works)))
        await open_loop(offsets, lambda i: submit(*works[i]), late_ms)
    else:
        await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    await channel.close()
    return latencies, errors, elapsed, late_ms


async def one_run(kind: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from controller.api.server import ControllerApp
    from controller.config import Config
    layout = Layout((("rack-", args.nodes // NODES_PER_RACK),), NODES_PER_RACK)
    tenants = [f"lab-{i:02d}" for i in range(math.ceil((args.submits + args.warmup) / SUBMITS_PER_TENANT))]
    works = [(f"sub-{i:06d}", tenants[i % len(tenants)]) for i in range(args.submits + args.warmup)]
    async with database(kind, root) as url:
        t0 = time.perf_counter()
        await preload(url, layout, placements=args.placements, tenants=tenants, nodes_up=True)
        preload_s = time.perf_counter() - t0
        config = replace(Config(), listen="127.0.0.1:0", db_url=url, submits_per_minute=0,
                         bootstrap_admin_token_file=str(root / "admin.token"),
                         restart_grace_s=3600.0, heartbeat_timeout_s=3600.0)
        app = ControllerApp(config)
        address = await app.start()
        try:
            if args.no_reconciler:
                for task in app._tasks:  # bench only: the loop stopped, the rest of the controller as is
                    if task.get_name() == "reconciler":
                        task.cancel()
            token = (root / "admin.token").read_text().strip()
            await _submits(address, token, works[:args.warmup], args.clients, args.request_ids)
            async with recording(args.py_spy, root / "submit.pyspy.txt", rate_hz=100, log=root / "py-spy.log"):
                cpu0 = time.process_time()
                latencies, errors, elapsed, late_ms = await _submits(address, token, works[args.warmup:],
                                                                     args.clients, args.request_ids, args.rate)
                cpu = time.process_time() - cpu0
        finally:
            await app.stop(grace_s=1.0)
    return {
        "db": kind, "nodes": args.nodes, "placements": args.placements, "submits": args.submits,
        "clients": args.clients, "rate": args.rate, "warmup": args.warmup,
        "send_late_p99_ms": round(percentile(late_ms, 99), 1) if late_ms else None, "reconciler": not args.no_reconciler,
        "request_ids": args.request_ids,
        "preload_s": round(preload_s, 1), "elapsed_s": round(elapsed, 2),
        "submits_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 50), 1), "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies, default=0.0), 1), "process_cpu_s": round(cpu, 1),
        "errors": errors[:10], "error_count": len(errors),
        "profile": str(root / "submit.pyspy.txt") if args.py_spy else "",
    }


def report(r: dict[str, Any]) -> str:
    loop = "reconciler on" if r["reconciler"] else "reconciler off"
    offered = (f"offered at {r['rate']:g}/s (open loop, sent late p99 {r['send_late_p99_ms']} ms)" if r["rate"]
               else f"by {r['clients']} clients")
    return (f"{r['db']:8} {r['nodes']} nodes, {r['placements']} placements preloaded ({r['preload_s']} s); "
            f"{r['submits']} submits (after {r['warmup']}) {offered}, {loop}"
            f"{', request ids' if r['request_ids'] else ''}\n"
            f"  submit p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms | "
            f"{r['submits_per_s']} submits/s | process CPU {r['process_cpu_s']} s in {r['elapsed_s']} s | "
            f"errors: {r['error_count']}" + "".join(f"\n    {e}" for e in r["errors"])
            + (f"\n  profile: {r['profile']}" if r["profile"] else ""))


async def _run(args: argparse.Namespace) -> int:
    if args.nodes % NODES_PER_RACK:
        print(f"error: --nodes {args.nodes} is not a multiple of {NODES_PER_RACK}", file=sys.stderr)
        return 2
    results = []
    for kind in args.db:
        root = Path(tempfile.mkdtemp(prefix=f"maia-bench-submit-{kind}-"))
        result = await one_run(kind, args, root)
        results.append(result)
        print(report(result), flush=True)
        if not args.py_spy:
            subprocess.run(["rm", "-rf", str(root)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["error_count"] for r in results) else 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
