"""What the isolation watchdog's checks cost on a loaded Maia-shaped cluster.

The cluster and arrival stream of `bench.synthetic` (N nodes, tenants of every isolation level),
filled to `--fill` of the accelerators by one online `solve()`, written into a fresh SQLite
database; then, `--repeat` times each:
- a full check (`check_once()`: every row read in pages and folded into the watchdog's view,
  every rack judged in chunks in a worker thread);
- a change check after `--changed` deployments had their placements rewritten (deleted and
  inserted again, new ids) with the change logged as a plan commit logs it;
- `check_if_changed()` with nothing changed (one read of the versions: what most rounds cost).
Each is timed whole, with the longest the event loop was held during it (a 1 ms ticker's
longest lateness) and the garbage collections that ran during it (young ones, the longest).
The cluster must come out clean (a violation here is a solver bug).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from bench.synthetic import ACCELERATORS, arrival, cluster, requested

Doc = dict[str, Any]


def loaded_problem(n_nodes: int, fill: float, seed: int, rack_rules: bool = True) -> Doc:
    """The synthetic cluster with arrivals placed by one online solve, as an interchange document;
    without `rack_rules`, no tenant is dedicated_rack or excludes another (as in `bench e2e`)."""
    from scheduler import plan_to_dict, problem_from_dict, solve

    rng = random.Random(seed)
    doc = cluster(n_nodes, seed)
    if not rack_rules:
        doc["tenants"] = [{**t, "isolation": "shared" if t["isolation"] == "dedicated_rack" else t["isolation"],
                           "excludes": []} for t in doc["tenants"]]
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


class _Pauses:
    """Garbage collections (generation, ms) and the event loop's longest lateness while active."""

    def __init__(self) -> None:
        self.collections: list[tuple[int, float]] = []
        self.loop_held_ms = 0.0
        self._started = 0.0
        self._ticker: asyncio.Task[None] | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.collections.append((info["generation"], (time.perf_counter() - self._started) * 1000))

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.loop_held_ms = max(self.loop_held_ms, (time.perf_counter() - t0) * 1000 - 1)

    async def __aenter__(self) -> _Pauses:
        gc.callbacks.append(self._on_gc)
        self._ticker = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)

    @property
    def young(self) -> list[float]:
        return [ms for generation, ms in self.collections if generation == 0]


async def _rewrite_placements(db: Any, keys: list[str]) -> None:
    """The placements of `keys` deleted and inserted again (new ids), logged as a plan commit logs its change."""
    from sqlalchemy import delete, select

    from controller.domain.changes import ClusterChange
    from controller.domain.values import split_deployment_key
    from controller.store import models as m
    from controller.store.changes import bump_cluster_generation

    async with db.unit_of_work() as uow:
        s = uow.session
        for key in keys:
            tenant, name = split_deployment_key(key)
            dep_id = (await s.execute(select(m.Deployment.id).where(
                m.Deployment.tenant_id == tenant, m.Deployment.name == name))).scalar_one()
            rows = (await s.execute(select(m.Placement).where(m.Placement.deployment_id == dep_id))).scalars().all()
            again = [{"deployment_id": dep_id, "replica": p.replica, "shard": p.shard, "node_id": p.node_id,
                      "accelerator_indices": p.accelerator_indices, "accelerator_milli": p.accelerator_milli,
                      "phase": p.phase} for p in rows]
            await s.execute(delete(m.Placement).where(m.Placement.deployment_id == dep_id))
            if again:
                await s.execute(insert(m.Placement), again)
        await bump_cluster_generation(s, ClusterChange.placements(keys))
        await uow.commit()


async def _measure(doc: Doc, repeat: int, changed: int, directory: Path) -> dict[str, Any]:
    from controller.store.db import Database
    from controller.store.migrate import ensure_schema
    from controller.watchdog import IsolationWatchdog

    db = Database(f"sqlite+aiosqlite:///{directory / 'maia.db'}")
    try:
        await ensure_schema(db, migrate=True)
        await write_problem(db, doc)
        watchdog = IsolationWatchdog(db)
        await watchdog.check_once()  # the view built (a controller's first check)
        placed = sorted({f"{d['tenant']}/{d['id']}" for d in doc["deployments"]
                         for p in doc["placements"] if p["deployment"] == d["id"]})
        rng = random.Random(1)
        results: dict[str, list[dict[str, float]]] = {"full": [], "change": [], "unchanged": []}
        for _ in range(repeat):
            for kind in ("full", "change", "unchanged"):
                if kind == "change":
                    await _rewrite_placements(db, rng.sample(placed, min(changed, len(placed))))
                rows, judged = watchdog.rows_read_total, watchdog.placements_judged_total
                async with _Pauses() as pauses:
                    t0 = time.perf_counter()
                    if kind == "full":
                        await watchdog.check_once()
                    else:
                        await watchdog.check_if_changed()
                    ms = (time.perf_counter() - t0) * 1000
                results[kind].append({
                    "ms": ms, "loop_held_ms": pauses.loop_held_ms, "young": len(pauses.young),
                    "young_max_ms": max(pauses.young, default=0.0),
                    "older": sum(1 for generation, _ in pauses.collections if generation > 0),
                    "rows": watchdog.rows_read_total - rows, "judged": watchdog.placements_judged_total - judged})
        return {"violations": [v.message for v in watchdog._view.violations], "alarms": watchdog.alarms_total,
                "full_checks": watchdog.full_checks_total,
                **{kind: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                   for kind, runs in results.items()},
                "young_max_ms": {kind: max(r["young_max_ms"] for r in runs) for kind, runs in results.items()}}
    finally:
        await db.dispose()


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    doc = loaded_problem(args.nodes, args.fill, args.seed, args.rack_rules)
    print(f"{args.nodes} nodes, {len(doc['deployments'])} deployments, {len(doc['placements'])} placed shards "
          f"(built in {time.perf_counter() - t0:.1f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="maia-bench-watchdog-") as tmp:
        result = asyncio.run(_measure(doc, args.repeat, args.changed, Path(tmp)))
    print(f"median of {args.repeat} (young collections: the longest of all runs):")
    for kind, what in (("full", "full check"), ("change", f"change check, {args.changed} deployments rewritten"),
                       ("unchanged", "round with nothing changed")):
        r = result[kind]
        print(f"  {what}: {r['ms']:.1f} ms, event loop held <= {r['loop_held_ms']:.1f} ms, "
              f"{r['rows']:.0f} rows read, {r['judged']:.0f} placements judged; young collections "
              f"{r['young']:.0f} (longest {result['young_max_ms'][kind]:.1f} ms), older {r['older']:.0f}")
    print(f"violations {len(result['violations'])}")
    for message in result["violations"][:5]:
        print(f"  violation: {message}")
    return 1 if result["violations"] else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--fill", type=float, default=0.85, help="share of accelerators requested before measuring")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--changed", type=int, default=100,
                   help="deployments whose placements are rewritten before each change check (~2 s at 50/s)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rack-rules", action=argparse.BooleanOptionalAction, default=True,
                   help="tenants dedicated to racks and excluding others (--no-rack-rules: none, as in bench e2e: "
                        "a change check judges the changed nodes alone)")
