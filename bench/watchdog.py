"""What one isolation-watchdog check costs on a loaded Maia-shaped cluster.

The cluster and arrival stream of `bench.synthetic` (N nodes, tenants of every isolation level),
filled to `--fill` of the accelerators by one online `solve()`, written into a fresh SQLite
database; then `--repeat` watchdog checks, timed in two parts:
- read: `read_placements` (plain columns, placements in pages), on the event loop;
- check: `to_problem` + `find_violations`, in the worker thread;
and the whole `check_once()`; then `check_if_changed()` with nothing changed (one counter read,
what most rounds cost). The cluster must come out clean (a violation here is a solver bug).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from bench.synthetic import ACCELERATORS, arrival, cluster, requested

Doc = dict[str, Any]


def loaded_problem(n_nodes: int, fill: float, seed: int) -> Doc:
    """The synthetic cluster with arrivals placed by one online solve, as an interchange document."""
    from scheduler import plan_to_dict, problem_from_dict, solve

    rng = random.Random(seed)
    doc = cluster(n_nodes, seed)
    stream: list[Doc] = []
    total = 0.0
    while total < fill * ACCELERATORS * len(doc["nodes"]):
        stream.append(arrival(rng, len(stream)))
        total += requested(stream[-1])
    plan = solve(problem_from_dict({**doc, "deployments": stream, "options": {"mode": "online"}}), time_limit_ms=None)
    return {**doc, "deployments": stream, "placements": plan_to_dict(plan)["placements"]}


async def write_problem(db: Any, doc: Doc) -> None:
    """The document's rows, bulk-inserted (node states and tenant contracts as the snapshot reads them)."""
    from controller.store import models as m

    def rows(items: list[Doc], **columns: Any) -> list[Doc]:
        return [{name: get(item) for name, get in columns.items()} for item in items]

    async with db.unit_of_work() as uow:
        s = uow.session
        await s.execute(insert(m.Zone), rows(doc["zones"], id=lambda z: z["id"]))
        await s.execute(insert(m.Row), rows(doc["rows"], id=lambda r: r["id"], zone_id=lambda r: r["zone"],
                                           power_budget_w=lambda r: r.get("power_budget_w")))
        await s.execute(insert(m.Rack), rows(doc["racks"], id=lambda r: r["id"], row_id=lambda r: r["row"],
                                            power_budget_w=lambda r: r.get("power_budget_w")))
        await s.execute(insert(m.Node), rows(
            doc["nodes"], id=lambda n: n["id"], rack_id=lambda n: n["rack"], accelerators=lambda n: n["accelerators"],
            hbm_gib=lambda n: n.get("hbm_gib"), idle_power_w=lambda n: n.get("idle_power_w", 0.0),
            accelerator_model=lambda n: n.get("accelerator_model", ""),
            health=lambda n: m.NodeHealth.DOWN if n.get("state") == "down" else m.NodeHealth.UP,
            cordoned=lambda n: n.get("state") == "cordoned",
            evicted_at=lambda n: m.utcnow() if n.get("state") == "down" else None))  # down, as the solver saw it
        await s.execute(insert(m.Tenant), rows(
            doc["tenants"], id=lambda t: t["id"], isolation=lambda t: m.Isolation(t.get("isolation", "shared")),
            excludes=lambda t: t.get("excludes", []), zones=lambda t: t.get("zones", []),
            max_accelerators=lambda t: t.get("max_accelerators"), max_power_w=lambda t: t.get("max_power_w")))
        ids = {}
        for d in doc["deployments"]:
            shard = d["shard"]
            result = await s.execute(insert(m.Deployment).returning(m.Deployment.id), [{
                "name": d["id"], "tenant_id": d["tenant"], "replicas": d["replicas"],
                "shards_per_replica": d["shards_per_replica"], "shard_accelerators": shard["accelerators"],
                "shard_accelerator_milli": shard.get("accelerator_milli", 1000),
                "shard_hbm_gib": shard.get("hbm_gib", 0.0), "shard_power_w": shard.get("power_w", 0.0),
                "locality": m.Domain(d.get("locality", "rack")), "phase": m.DeploymentPhase.RUNNING}])
            ids[d["id"]] = result.scalar_one()
        if doc["placements"]:
            await s.execute(insert(m.Placement), [
                {"deployment_id": ids[p["deployment"]], "replica": p["replica"], "shard": p["shard"],
                 "node_id": p["node"], "accelerator_indices": p["accelerator_indices"],
                 "accelerator_milli": p.get("accelerator_milli"), "phase": m.ShardPhase.RUNNING}
                for p in doc["placements"]])
        await uow.commit()


async def _measure(doc: Doc, repeat: int, directory: Path) -> dict[str, Any]:
    from controller.store.db import Database
    from controller.store.migrate import ensure_schema
    from controller.store.isolation import read_placements
    from controller.watchdog import IsolationWatchdog, violations_in

    db = Database(f"sqlite+aiosqlite:///{directory / 'maia.db'}")
    try:
        await ensure_schema(db, migrate=True)
        await write_problem(db, doc)
        watchdog = IsolationWatchdog(db)
        read_ms, check_ms, whole_ms = [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            async with db.unit_of_work() as uow:
                stored = await read_placements(uow.session)
            t1 = time.perf_counter()
            found = violations_in(stored)
            t2 = time.perf_counter()
            await watchdog.check_once()
            whole_ms.append(watchdog.last_check_ms)
            read_ms.append((t1 - t0) * 1000)
            check_ms.append((t2 - t1) * 1000)
        idle_ms = []
        for _ in range(repeat):  # nothing changed: one counter read
            t0 = time.perf_counter()
            assert await watchdog.check_if_changed() is None
            idle_ms.append((time.perf_counter() - t0) * 1000)
        return {"violations": [v.message for v in found], "alarms": watchdog.alarms_total,
                "unchanged_ms": statistics.median(idle_ms),
                "read_ms": statistics.median(read_ms), "check_ms": statistics.median(check_ms),
                "check_once_ms": statistics.median(whole_ms)}
    finally:
        await db.dispose()


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    doc = loaded_problem(args.nodes, args.fill, args.seed)
    print(f"{args.nodes} nodes, {len(doc['deployments'])} deployments, {len(doc['placements'])} placed shards "
          f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="maia-bench-watchdog-") as tmp:
        result = asyncio.run(_measure(doc, args.repeat, Path(tmp)))
    print(f"median of {args.repeat}: read {result['read_ms']:.0f} ms (event loop), "
          f"to_problem + find_violations {result['check_ms']:.0f} ms (worker thread), "
          f"check_once {result['check_once_ms']:.0f} ms; a round with nothing changed "
          f"{result['unchanged_ms']:.1f} ms; violations {len(result['violations'])}")
    for message in result["violations"][:5]:
        print(f"  violation: {message}")
    return 1 if result["violations"] else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--fill", type=float, default=0.85, help="share of accelerators requested before measuring")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
