"""What one plan commit costs on a loaded cluster: unscoped (the whole cluster read under the
generation lock) vs scoped (`commit_plan(scope=...)`: the plan's deployments and the rows its
replicas land on).

The synthetic cluster of `bench synthetic` (`--nodes`), filled to `--fill` of its accelerators by
one online `solve()` (`bench.watchdog.loaded_problem`), written into a fresh SQLite file or a
throwaway PostgreSQL (bench/pgserver.py). The snapshot is read once and then kept current from
each `CommitResult.shards`, the way a warm cache is. Then, for each plan size (`--sizes`: new
single-shard deployments of a tenant of its own) and `--repeat` times, unscoped and scoped in
turn:
- the new deployments are inserted and the generation bumped (not timed); the cached snapshot
  learns them and the generation;
- the plan puts each on a free accelerator of an empty node; unscoped it also names every
  placement the snapshot holds (today's plan: the whole cluster), scoped just the new ones;
- timed: `commit_plan` + the transaction's commit (wall), and how long the generation lock is
  held (from the UPDATE of `cluster_state` to the end of the commit); once per mode and size,
  the rows the commit's SELECTs returned; the statements the last commit sent (the COMMIT itself
  is not a cursor statement).
In-process, one connection, no other writer: the lock is never waited for here. With
`--busy-loop-ms N` a task keeps the event loop busy in slices of N ms (what a controller's loop
shared with thousands of agents is like), so each trip to SQLite's thread waits for a slice, as
in the controller under load; on SQLite the last commit's trips are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

from bench.watchdog import loaded_problem, write_problem

Doc = dict[str, Any]
TENANT = "bench"


@dataclasses.dataclass
class Timing:
    size: int
    scoped: bool
    commit_ms: list[float] = dataclasses.field(default_factory=list)
    lock_ms: list[float] = dataclasses.field(default_factory=list)
    rows_read: int = 0
    statements: int = 0  # SQL statements the last commit sent, the COMMIT not counted
    trips: int = 0  # trips the last commit took to SQLite's thread, the COMMIT's counted (0: not SQLite)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else 0.0


def free_slots(snapshot: Any) -> Iterator[tuple[str, int]]:
    """(node, accelerator) of ready nodes nothing runs on, in racks without a dedicated_rack tenant."""
    problem = snapshot.problem
    tenants = {t["id"]: t for t in problem["tenants"]}
    deployments = {d["id"]: d for d in problem["deployments"]}
    rack_of = {n["id"]: n["rack"] for n in problem["nodes"]}
    busy, closed_racks = set(), set()
    for p in problem["placements"]:
        busy.add(p["node"])
        tenant = tenants.get(deployments[p["deployment"]]["tenant"], {})
        if tenant.get("isolation") == "dedicated_rack":
            closed_racks.add(rack_of[p["node"]])
    for n in problem["nodes"]:
        if n.get("state", "ready") == "ready" and n["id"] not in busy and n["rack"] not in closed_racks:
            yield from ((n["id"], i) for i in range(n["accelerators"]))


@contextmanager
def _lock_clock(engine: Any) -> Iterator[tuple[list[float], list[str]]]:
    """Appends the time each UPDATE of cluster_state returned (the generation lock taken), and
    every statement sent (an executemany counts once)."""
    taken: list[float] = []
    sent: list[str] = []

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)
        if re.match(r"\s*UPDATE\s+(/\*.*?\*/\s*)?CLUSTER_STATE\b", statement, re.IGNORECASE):  # maybe marked (store/marks.py)
            taken.append(time.perf_counter())

    event.listen(engine.sync_engine, "after_cursor_execute", after)
    try:
        yield taken, sent
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", after)


async def _busy(slice_ms: float) -> None:
    """Keeps the event loop busy in slices of `slice_ms`, yielding between them."""
    while True:
        until = time.perf_counter() + slice_ms / 1000
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0)


@contextmanager
def rows_read(session: Any) -> Iterator[list[int]]:
    """Counts the rows each SELECT through `session` returns."""
    counts: list[int] = []

    def count(state: Any) -> Any:
        if not state.is_select:
            return None
        frozen = state.invoke_statement().freeze()
        counts.append(len(frozen().all()))
        return frozen()

    event.listen(session.sync_session, "do_orm_execute", count)
    try:
        yield counts
    finally:
        event.remove(session.sync_session, "do_orm_execute", count)


async def _measure(url: str, doc: Doc, sizes: list[int], repeat: int, modes: tuple[bool, ...],
                   busy_loop_ms: float = 0.0) -> dict[str, Any]:
    from controller.store import models as m
    from controller.store.db import Database
    from controller.store.migrate import ensure_schema
    from controller.store.plans import bump_cluster_generation, commit_plan
    from controller.store.snapshot import load_snapshot
    from controller.store.sqlite_driver import counted_trips
    from scheduler import Placement, Plan

    db = Database(url)
    try:
        await ensure_schema(db, migrate=True)
        await write_problem(db, doc)
        async with db.unit_of_work() as uow:
            uow.session.add(m.Tenant(id=TENANT, isolation=m.Isolation.SHARED))
            await uow.commit()
        load_ms = []
        for _ in range(3):
            t0 = time.perf_counter()
            async with db.unit_of_work() as uow:
                snap = await load_snapshot(uow.session)
            load_ms.append((time.perf_counter() - t0) * 1000)
        slots = free_slots(snap)
        placements = list(snap.problem["placements"])
        deployments = list(snap.problem["deployments"])
        ids = dict(snap.deployment_ids)
        timings = {(size, scoped): Timing(size, scoped) for size in sizes for scoped in modes}
        turned_away = 0
        for rep in range(repeat):
            for size in sizes:
                for scoped in modes:
                    names = [f"r{rep}-k{size}-{'s' if scoped else 'u'}-{i}" for i in range(size)]
                    async with db.unit_of_work() as uow:
                        written = await uow.session.execute(insert(m.Deployment).returning(m.Deployment.id), [
                            {"name": name, "tenant_id": TENANT, "replicas": 1, "shards_per_replica": 1,
                             "shard_accelerators": 1, "locality": m.Domain.NODE} for name in names])
                        new_ids = list(written.scalars())
                        generation = await bump_cluster_generation(uow.session)
                        await uow.commit()
                    keys = [f"{TENANT}/{name}" for name in names]
                    ids.update(zip(keys, new_ids))
                    deployments += [{"id": key, "tenant": TENANT, "replicas": 1, "shards_per_replica": 1,
                                     "locality": "node", "shard": {"accelerators": 1}} for key in keys]
                    cached = dataclasses.replace(snap, generation=generation, deployment_ids=dict(ids),
                                                 problem={**snap.problem, "deployments": list(deployments),
                                                          "placements": list(placements)})
                    new = tuple(Placement(key, 0, 0, node, (index,)) for key, (node, index) in zip(keys, slots))
                    if len(new) < size:
                        raise SystemExit("no free accelerators left: fewer --repeat or a lower --fill")
                    kept = () if scoped else tuple(
                        Placement(p["deployment"], p["replica"], p["shard"], p["node"], tuple(p["accelerator_indices"]),
                                  p.get("accelerator_milli")) for p in placements)
                    plan = Plan("optimal", kept + new)
                    timing = timings[(size, scoped)]
                    busy = asyncio.create_task(_busy(busy_loop_ms)) if busy_loop_ms > 0 else None
                    async with db.unit_of_work() as uow:
                        counting = rows_read(uow.session) if rep == 0 else _no_count()
                        with _lock_clock(db.engine) as (taken, sent), counting as counts, counted_trips() as trips:
                            t0 = time.perf_counter()
                            result = await commit_plan(uow.session, cached, plan, scope=set(keys) if scoped else None)
                            await uow.commit()
                            t1 = time.perf_counter()
                    if busy is not None:
                        busy.cancel()
                    timing.statements = len(sent)  # the last commit's (the first may warm up: audit.append)
                    timing.trips = len(trips)
                    if rep == 0:
                        timing.rows_read = sum(counts)
                    else:  # the first round also counted rows: not timed
                        timing.commit_ms.append((t1 - t0) * 1000)
                        timing.lock_ms.append((t1 - taken[0]) * 1000)
                    turned_away += len(result.requeued)
                    for (key, replica, shard), where in result.shards.items():
                        if where is not None:
                            placements.append({"deployment": key, "replica": replica, "shard": shard,
                                               "node": where[0], "accelerator_indices": list(where[1])})
        async with db.unit_of_work() as uow:  # the cache kept from CommitResult.shards is the committed state
            stored = (await load_snapshot(uow.session)).problem["placements"]
        cache_matches = sorted(map(_shard, stored)) == sorted(map(_shard, placements))
        return {"load_snapshot_ms": statistics.median(load_ms), "cache_matches": cache_matches, "placements": len(snap.problem["placements"]),
                "deployments": len(snap.problem["deployments"]), "turned_away": turned_away,
                "timings": list(timings.values())}
    finally:
        await db.dispose()


def _shard(p: Doc) -> tuple[Any, ...]:
    return p["deployment"], p["replica"], p["shard"], p["node"], tuple(p["accelerator_indices"])


@contextmanager
def _no_count() -> Iterator[list[int]]:
    yield []


async def _run(args: argparse.Namespace, backend: str, doc: Doc, directory: Path) -> dict[str, Any]:
    modes = (True,) if getattr(args, "scoped_only", False) else (False, True)
    if backend == "sqlite":
        return await _measure(f"sqlite+aiosqlite:///{directory / 'maia.db'}", doc, args.sizes, args.repeat, modes,
                              getattr(args, "busy_loop_ms", 0.0))
    from bench.pgserver import LocalPostgres, create_database, find_pg_bin_dir

    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        raise SystemExit("no PostgreSQL server binaries (make postgres)")
    server = LocalPostgres(bin_dir)
    try:
        url = await create_database(server.start(), prefix="maia_bench")
        return await _measure(url, doc, args.sizes, args.repeat, modes, getattr(args, "busy_loop_ms", 0.0))
    finally:
        server.stop()


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    doc = loaded_problem(args.nodes, args.fill, args.seed)
    print(f"{args.nodes} nodes, {len(doc['deployments'])} deployments, {len(doc['placements'])} placed shards "
          f"(built in {time.perf_counter() - t0:.1f} s); load average {os.getloadavg()[0]:.1f}", flush=True)
    ok = True
    for backend in args.db:
        with tempfile.TemporaryDirectory(prefix="maia-bench-commit-") as tmp:
            result = asyncio.run(_run(args, backend, doc, Path(tmp)))
        _report(args, backend, result)
        ok = ok and result["cache_matches"]
    return 0 if ok else 1


def _report(args: argparse.Namespace, backend: str, result: dict[str, Any]) -> None:
    print(f"{backend}: {result['placements']} placements of {result['deployments']} deployments; "
          f"load_snapshot (what a pass reads) median {result['load_snapshot_ms']:.0f} ms; "
          f"replicas turned away {result['turned_away']}; cache kept from CommitResult.shards "
          f"{'equals' if result['cache_matches'] else 'DIFFERS FROM'} the committed state")
    print(f"{'plan':>10} {'commit':>9} {'p50 ms':>8} {'p99 ms':>8} {'lock p50':>9} {'lock p99':>9} {'rows read':>10} "
          f"{'SQL':>4} {'trips':>6} {'deps/s':>7}")
    for t in result["timings"]:
        print(f"{t.size:>4} dep(s) {'scoped' if t.scoped else 'unscoped':>9} {percentile(t.commit_ms, 50):>8.1f} "
              f"{percentile(t.commit_ms, 99):>8.1f} {percentile(t.lock_ms, 50):>9.1f} {percentile(t.lock_ms, 99):>9.1f} "
              f"{t.rows_read:>10} {t.statements:>4} {t.trips:>6} {t.size * 1000 / max(statistics.mean(t.commit_ms or [0.0]), 1e-9):>7.0f}")
    print(f"({args.repeat - 1} timed commits each; load average now {os.getloadavg()[0]:.1f})", flush=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("commit", help="one plan commit on a loaded cluster: unscoped vs commit_plan(scope=...)")
    p.add_argument("--nodes", type=int, default=4096)
    p.add_argument("--fill", type=float, default=0.7, help="share of accelerators requested before measuring")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 32], help="new deployments per plan")
    p.add_argument("--repeat", type=int, default=21, help="commits per size and mode (the first is not timed)")
    p.add_argument("--db", choices=("sqlite", "postgres"), nargs="+", default=["sqlite"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scoped-only", action="store_true", help="skip the unscoped commits (slow at size)")
    p.add_argument("--busy-loop-ms", type=float, default=0.0,
                   help="keep the event loop busy in slices of this many ms while committing (0: idle)")
    p.set_defaults(func=main)
