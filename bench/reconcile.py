"""Per-pass cost of the reconcile loop on a big, busy cluster: the warm fast path against the
full path (every pass re-reads the whole cluster and solves it), in-process.

1. A fresh database (SQLite file, or PostgreSQL as the tests start it) is loaded directly with
   the synthetic Maia-shaped cluster of `bench/synthetic.py` (`--nodes`; its down nodes stored
   as cordoned, all up) and a background of deployments placed by the independent best-fit
   greedy until about `--placements` shards run (phase running).
2. A `Reconciler` (no agents: push/publish do nothing) makes its first pass, then a burst of
   `--arrivals` deployments of the synthetic mix arrives in batches of `--batch` (rows inserted
   directly: the submit RPC is measured by `bench e2e`); after each batch the bench times one
   `reconcile_once()`, as the loop would run it: a fast pass on the warm cache, a fast pass that
   first builds the cache from a fresh snapshot, or a full pass (the back-off's retry of what
   the session could not place once `--backoff-s` is over, or a forced one). `--path full`
   forces every pass down the full path (the loop as it was before the cache).
3. The committed state is read back with `load_snapshot` and graded by the independent checker.

With `--changes K`, the first K batches each come with one change by others, in turn (those of
`--change-kinds`, all by default): a drain of a node holding shards, an update of a placed
deployment that rolls it (a new shard shape), a shard reported FAILED (released at once: no
restart back-off), a scale down of a placed deployment by one replica, the batch placed by another
controller on the same database (a second `Reconciler`, as after a handover; its first pass
reads the whole cluster, untimed), a node holding shards deleted, or registering again with half
its accelerators (the shards on the others released); the passes that follow each kind
are reported apart (`after_<kind>`: warm or full, and their times), which says whether that kind
of change costs a whole-cluster pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fgd import percentile
from bench.synthetic import TENANTS, arrival, cluster

Doc = dict[str, Any]
CHANGES = ("drain", "update", "fail", "scale_down", "other_commit", "delete_node", "resize")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--placements", type=int, default=10_000, help="background shards placed before the burst")
    p.add_argument("--arrivals", type=int, default=200)
    p.add_argument("--batch", type=int, default=10, help="arrivals between two passes")
    p.add_argument("--path", choices=("fast", "full", "both"), default="both")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--time-limit-ms", type=int, default=2000)
    p.add_argument("--backoff-s", type=float, default=1.0, help="the reconciler's back-off before the full retry")
    p.add_argument("--changes", type=int, default=0,
                   help="batches that come with a change by others (drain, rolling update, FAILED shard, ..., in turn)")
    p.add_argument("--change-kinds", default=",".join(CHANGES),
                   help=f"the kinds of change by others, in turn (of {', '.join(CHANGES)})")
    p.add_argument("--json", default="")


def _background(doc: Doc, target_shards: int, rng: random.Random) -> tuple[list[Doc], list[Doc]]:
    from bench.greedy import BestFitGreedy
    greedy = BestFitGreedy(doc)
    deployments: list[Doc] = []
    while len(greedy.placements) < target_shards:
        d = arrival(rng, len(deployments))
        deployments.append(d)
        greedy.place(d)
    placed = {p["deployment"] for p in greedy.placements}
    return [d for d in deployments if d["id"] in placed], greedy.placements


def _deployment_row(d: Doc) -> Doc:
    from controller.store import models as m
    shard = d["shard"]
    return {"name": d["id"], "tenant_id": d["tenant"], "replicas": d["replicas"], "min_replicas": 1,
            "shards_per_replica": d["shards_per_replica"], "shard_accelerators": shard["accelerators"],
            "shard_accelerator_milli": shard.get("accelerator_milli", 1000), "shard_hbm_gib": shard.get("hbm_gib", 0),
            "shard_cpu_milli": shard.get("cpu_milli", 0), "shard_memory_mib": shard.get("memory_mib", 0),
            "shard_power_w": shard.get("power_w", 0), "shard_accelerator_models": [],
            "locality": m.Domain(d["locality"]), "priority": d.get("priority", 0),
            "preemptible": d.get("preemptible", False), "phase": m.DeploymentPhase.PENDING}


async def _load(db: Any, doc: Doc, background: list[Doc], placements: list[Doc]) -> None:
    from sqlalchemy import insert, select
    from controller.store import models as m
    now = m.utcnow()
    async with db.unit_of_work() as uow:
        s = uow.session
        await s.execute(insert(m.Zone), [{"id": z["id"]} for z in doc["zones"]])
        await s.execute(insert(m.Row), [{"id": r["id"], "zone_id": r["zone"], "power_budget_w": r.get("power_budget_w")}
                                        for r in doc["rows"]])
        await s.execute(insert(m.Rack), [{"id": r["id"], "row_id": r["row"], "power_budget_w": r.get("power_budget_w")}
                                         for r in doc["racks"]])
        await s.execute(insert(m.Node), [
            {"id": n["id"], "rack_id": n["rack"], "accelerators": n["accelerators"],
             "accelerator_model": n["accelerator_model"], "hbm_gib": n["hbm_gib"], "cpu_milli": n["cpu_milli"],
             "memory_mib": n["memory_mib"], "idle_power_w": n["idle_power_w"], "cordoned": n["state"] != "ready",
             "health": m.NodeHealth.UP, "last_heartbeat_at": now} for n in doc["nodes"]])
        await s.execute(insert(m.Tenant), [
            {"id": t["id"], "isolation": m.Isolation(t["isolation"]), "excludes": t.get("excludes", []),
             "zones": t.get("zones", []), "max_accelerators": t.get("max_accelerators"),
             "max_power_w": t.get("max_power_w")} for t in doc["tenants"]])
        rows = [dict(_deployment_row(d), phase=m.DeploymentPhase.RUNNING, generation=1) for d in background]
        for start in range(0, len(rows), 500):
            await s.execute(insert(m.Deployment), rows[start:start + 500])
        ids = {name: i for i, name in await s.execute(select(m.Deployment.id, m.Deployment.name))}
        shards = [{"deployment_id": ids[p["deployment"]], "replica": p["replica"], "shard": p["shard"],
                   "node_id": p["node"], "accelerator_indices": list(p["accelerator_indices"]),
                   "accelerator_milli": p.get("accelerator_milli"), "phase": m.ShardPhase.RUNNING, "generation": 1}
                  for p in placements]
        for start in range(0, len(shards), 500):
            await s.execute(insert(m.Placement), shards[start:start + 500])
        await uow.commit()


async def _submit(db: Any, batch: list[Doc]) -> None:
    from sqlalchemy import insert
    from controller.store import models as m
    async with db.unit_of_work() as uow:
        await uow.session.execute(insert(m.Deployment), [_deployment_row(d) for d in batch])
        await uow.commit()


async def _change(db: Any, kind: str, placements: list[Doc], rng: random.Random, other: Any) -> None:
    """One change by others of `kind` (`CHANGES`), through the use cases, on a placed shard; or
    a pass of the `other` controller."""
    if kind == "other_commit":
        await other.reconcile_once()
        return
    import dataclasses
    from datetime import datetime, timezone
    from controller.domain.values import NodeInfo, ShardReport
    from controller.identity import Principal
    from controller.store import repositories as repo
    from controller.usecases import agents, nodes, updates
    from controller.usecases.ports import RecordingSignals
    from controller.store.snapshot import load_snapshot
    who = Principal("bench")
    async with db.unit_of_work() as uow:
        snapshot = await load_snapshot(uow.session)
    placed = [p for p in snapshot.problem["placements"] if "~" not in p["deployment"]]
    if kind == "scale_down":  # a deployment with two replicas placed or more
        replicas: dict[str, set[int]] = {}
        for q in placed:
            replicas.setdefault(q["deployment"], set()).add(q["replica"])
        placed = [q for q in placed if len(replicas[q["deployment"]]) > 1] or placed
    p = rng.choice(placed)
    tenant, name = p["deployment"].split("/")
    async with db.unit_of_work() as uow:
        if kind == "drain":
            await nodes.drain_node(uow, who, p["node"], RecordingSignals(), set(), {})
        elif kind == "delete_node":
            await nodes.delete_node(uow, who, p["node"], RecordingSignals())
        elif kind == "resize":
            node = next(n for n in snapshot.problem["nodes"] if n["id"] == p["node"])
            reg = await agents.register_node(uow, who, NodeInfo(
                node_id=node["id"], rack=node["rack"], accelerators=max(1, node["accelerators"] // 2),
                accelerator_model=node.get("accelerator_model", ""), hbm_gib=node.get("hbm_gib"),
                cpu_milli=node.get("cpu_milli"), memory_mib=node.get("memory_mib"),
                idle_power_w=node["idle_power_w"], labels=node.get("labels", {})), heartbeat_interval_ms=1000)
            await uow.commit()
            async with db.unit_of_work() as hello:
                await agents.hello(hello, who, node["id"], reg.session_id, datetime.now(timezone.utc))
        elif kind in ("update", "scale_down"):
            view = repo.deployment_view(await repo.get_deployment(uow.session, tenant, name))
            spec = dataclasses.replace(view.spec, shard=dataclasses.replace(
                view.spec.shard, hbm_gib=view.spec.shard.hbm_gib + 1.0)) if kind == "update" else \
                dataclasses.replace(view.spec, replicas=max(1, view.spec.replicas - 1))
            await updates.update_deployment(uow, who, spec, view.resource_version, RecordingSignals())
        else:
            rows = await repo.placements_of_deployments(uow.session, [p["deployment"]])
            row = rows[0][0]
            await agents.flush_reports(uow, {}, [(row.node_id, ShardReport(
                name, row.replica, row.shard, 10**9, "failed", "bench", tenant=tenant))])


async def run_path(path: str, url: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench.checking import check_state
    from controller.domain.restarts import RestartPolicy
    from controller.reconcile import Reconciler
    from controller.store.db import Database
    from controller.store.migrate import ensure_schema
    from controller.store.snapshot import load_snapshot

    rng = random.Random(args.seed)
    doc = cluster(args.nodes, args.seed)
    for n in doc["nodes"]:
        n["state"] = "cordoned" if n["state"] != "ready" else "ready"
    doc["tenants"] = [t for t in doc["tenants"] if t["id"] in {x["id"] for x in TENANTS}]
    background, placements = _background(doc, args.placements, rng)
    burst = [arrival(rng, len(background) * 2 + i) for i in range(args.arrivals)]
    db = Database(url)

    async def nothing(*_: Any) -> None:
        return None

    try:
        await ensure_schema(db, migrate=True)
        await _load(db, doc, background, placements)
        loop = Reconciler(db, push=lambda nodes: None, publish=nothing, solve_time_limit_ms=args.time_limit_ms,
                          backoff_s=args.backoff_s, restart_policy=RestartPolicy(initial_delay_s=0.0))
        # Another controller on the same database (`other_commit`).
        other = Reconciler(db, push=lambda nodes: None, publish=nothing, solve_time_limit_ms=args.time_limit_ms,
                           backoff_s=args.backoff_s, restart_policy=RestartPolicy(initial_delay_s=0.0))
        t0 = time.perf_counter()
        await loop.reconcile_once()
        first_s = time.perf_counter() - t0
        passes: dict[str, list[float]] = {"warm": [], "rebuild": [], "full": []}
        kinds = [kind for kind in args.change_kinds.split(",") if kind]
        if set(kinds) - set(CHANGES) or not kinds:
            raise SystemExit(f"--change-kinds: of {', '.join(CHANGES)}")
        after: dict[str, list[tuple[str, float]]] = {change: [] for change in kinds}
        busy = 0.0
        for start in range(0, len(burst), args.batch):
            await _submit(db, burst[start:start + args.batch])
            change = kinds[start // args.batch % len(kinds)] if start // args.batch < args.changes else None
            if change is not None:
                await _change(db, change, placements, rng, other)
            warm, full = loop.warm_snapshot is not None, loop.full_passes
            t = time.perf_counter()
            await loop.reconcile_once(force=path == "full")
            seconds = time.perf_counter() - t
            busy += seconds
            kind = "full" if loop.full_passes != full else "warm" if warm else "rebuild"
            passes[kind].append(1000 * seconds)
            if change is not None:
                after[change].append((kind, 1000 * seconds))
        while True:  # what is left to the back-off once the burst is over (counted in the rate)
            await asyncio.sleep(max(0.0, args.backoff_s))
            t = time.perf_counter()
            if not (await loop.reconcile_once()).solved:
                break
            busy += time.perf_counter() - t
            passes["full"].append(1000 * (time.perf_counter() - t))
        async with db.unit_of_work() as uow:
            final = await load_snapshot(uow.session)
        placed = {p["deployment"] for p in final.problem["placements"]}
        new = {f"{d['tenant']}/{d['id']}" for d in burst}
        violations = check_state(final.problem, final.problem["placements"])
    finally:
        await db.dispose()
    every = [ms for kind in passes.values() for ms in kind]
    return {"path": path, "db": args.db, "nodes": args.nodes, "background_shards": len(placements),
            "arrivals": len(burst), "batch": args.batch, "first_pass_s": round(first_s, 2),
            "pass_p50_ms": round(percentile(every, 50), 1), "pass_p99_ms": round(percentile(every, 99), 1),
            **{f"{kind}_passes": len(ms) for kind, ms in passes.items()},
            **{f"{kind}_p50_p99_ms": [round(percentile(ms, 50), 1), round(percentile(ms, 99), 1)]
               for kind, ms in passes.items() if ms},
            "decisions_per_s": round(len(burst) / busy, 1), "placed": len(new & placed),
            "violations": len(violations),
            **{f"after_{change}": {"full": sum(kind == "full" for kind, _ in seen), "passes": len(seen),
                                   "p50_ms": round(percentile([ms for _, ms in seen], 50), 1)}
               for change, seen in after.items() if seen}}


async def _one(path: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.db == "sqlite":
        with tempfile.TemporaryDirectory(prefix="maia-bench-reconcile-") as root:
            return await run_path(path, f"sqlite+aiosqlite:///{Path(root) / 'maia.db'}", args)
    from bench.pgserver import LocalPostgres, create_database, find_pg_bin_dir
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (make postgres)")
    server = LocalPostgres(bin_dir)
    try:
        return await run_path(path, await create_database(server.start(), prefix="maia_bench"), args)
    finally:
        server.stop()


def report(r: dict[str, Any]) -> str:
    kinds = ", ".join(f"{kind} {r[f'{kind}_passes']}" + (f" ({'/'.join(map(str, r[f'{kind}_p50_p99_ms']))} ms)"
                                                        if r[f"{kind}_passes"] else "")
                      for kind in ("warm", "rebuild", "full"))
    return (f"{r['path']:>4} {r['db']:>8} {r['nodes']:>6} nodes {r['background_shards']:>6} shards: "
            f"pass p50/p99 {r['pass_p50_ms']}/{r['pass_p99_ms']} ms, {r['decisions_per_s']} decisions/s; "
            f"passes {kinds}; placed {r['placed']}/{r['arrivals']}, first pass {r['first_pass_s']} s, "
            f"violations {r['violations']}"
            + "".join(f"; after a {change}: {r[f'after_{change}']['full']}/{r[f'after_{change}']['passes']} full, "
                      f"p50 {r[f'after_{change}']['p50_ms']} ms" for change in CHANGES if f"after_{change}" in r))


def main(args: argparse.Namespace) -> int:
    paths = ("full", "fast") if args.path == "both" else (args.path,)
    results = []
    for path in paths:
        r = asyncio.run(_one(path, args))
        print(report(r), flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["violations"] for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(argparse.ArgumentParser().parse_args()))
