"""Reconcile passes alone: the controller's CPU per deployment a fast pass decides, commits,
publishes and hands to a watcher.

In process, no gRPC and no agents: a database preloaded (`bench.preload`: `--nodes` nodes up,
`--placements` running single-shard deployments), a `Reconciler` as the controller builds it
(the warm session in a decide process of its own unless `--no-decide-process`; the views to
publish read by `usecases.deployments.views_of` on the pass's loop, then published to a
`DeploymentEventBus`), and one watcher on it as `WatchDeploymentBatches` serves one (each batch
converted to its protobuf message and serialized). Before each pass, untimed: `--arrivals`
single-accelerator deployments written as a submit batch writes them (and, as it does, told to
the reconciler's `SubmittedRows` when the tree has one), `--deletes` of the
deployments placed earlier marked DELETING as a delete batch marks them, and every
`--gang-every`th pass a gang of 8..64 one-accelerator shards (row locality), as `bench e2e`'s
mix; the garbage collector's thresholds are the controller's (`gcpolicy`). Per pass: the event
loop thread's CPU (`time.thread_time`) over `reconcile_once()` and the watcher's handling of what
it published, the process's (SQLite's thread, the worker threads;
not the decide process's), the statements sent; figures are medians per pass and per deployment
decided (arrivals and gang). Counts, not latencies: steadier on a shared machine. Run against an
older tree by copying this file into its bench/.

    python -m bench.passes --nodes 4096 --placements 10000 --arrivals 32 --deletes 3 --passes 150
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, select

from bench.assignments import preloaded
from bench.e2e import NODES_PER_RACK
from bench.selfprofile import recording
from controller.store import models as m
from controller.store.db import Database

TENANT = "bench"
GANG_SIZES = (8, 16, 32, 64)


class _Watcher:
    """One watch as `WatchDeploymentBatches` serves it: each batch of the bus's events converted
    to its message and serialized (what gRPC would send)."""

    def __init__(self, db: Database, bus: Any) -> None:
        self.events = 0
        self.live = asyncio.Event()  # past the current state: changes only
        self._task = asyncio.get_running_loop().create_task(self._watch(db, bus))

    async def _watch(self, db: Database, bus: Any) -> None:
        from controller.api import convert
        from controller.identity import Principal, Role
        from controller.usecases.watch import watch_deployment_batches
        admin = Principal("bench", Role.ADMIN)
        async for batch in watch_deployment_batches(db.unit_of_work, admin, bus):
            convert.deployment_event_batch_msg(batch).SerializeToString()  # as the handler builds it
            if any(e.type != "added" for e in batch):
                self.live.set()
            self.events += len(batch)

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def _submit(db: Database, names: list[str], sizes: list[int], submitted: Any = None) -> None:
    """New deployments as the submit batch writes them (PENDING, generation 0; the generation of
    the cluster untouched: arrivals are counted), told to `submitted` (`SubmittedRows`) as it does."""
    at = m.utcnow()
    async with db.unit_of_work() as uow:
        table = m.Deployment.__table__
        rows = await uow.session.execute(insert(table).returning(table.c.id, table.c.name), [
            {"name": name, "tenant_id": TENANT, "replicas": 1, "min_replicas": 1, "shards_per_replica": size,
             "shard_accelerators": 1, "shard_hbm_gib": 16.0, "shard_power_w": 300.0, "shard_accelerator_models": [],
             "locality": m.Domain.NODE if size == 1 else m.Domain.ROW, "phase": m.DeploymentPhase.PENDING,
             "reasons": [], "generation": 0, "revision_specs": {}, "created_at": at, "updated_at": at}
            for name, size in zip(names, sizes)])
        ids = list(rows)
        await uow.commit()
    if submitted is not None:
        from controller.store.snapshot import inserted_row
        submitted.add((f"{TENANT}/{name}", inserted_row(id_, at)) for id_, name in ids)


async def _delete(db: Database, names: list[str]) -> None:
    """Deployments marked DELETING as the delete batch marks them (`usecases.deployments.mark_deleting`)."""
    from controller.store import repositories as repo
    from controller.usecases.deployments import mark_deleting
    if not names:
        return
    async with db.unit_of_work() as uow:
        rows = [n.row for n in await repo.deployments_named(uow.session, names) if n.row.tenant_id == TENANT]
        await mark_deleting(uow, [(row, "bench") for row in rows])
        await uow.commit()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from controller.domain.values import DeploymentEvent
    from controller.reconcile import Reconciler
    from controller.scheduling.decider import DecideProcess
    from controller.usecases.deployments import views_of
    from controller.usecases.watch import DeploymentEventBus

    async with preloaded(args.nodes, args.placements, "maia-bench-passes-") as (db, _):
        bus = DeploymentEventBus()

        async def publish(keys: set[str], deleted: list[Any], views: list[Any] | None = None) -> None:
            for view in deleted:
                bus.publish(DeploymentEvent("deleted", view))
            for view in views or ():
                bus.publish(DeploymentEvent("modified", view))

        decider = DecideProcess() if args.decide_process else None
        try:  # as the controller wires it (trees before it: none)
            from controller.usecases.submits import SubmittedRows
        except ImportError:
            submitted, wiring = None, {}
        else:
            submitted = SubmittedRows()
            wiring = {"submitted": submitted}
        reconciler = Reconciler(db, push=lambda nodes: None, publish=publish, read_views=views_of, decider=decider,
                                **wiring)
        watcher = _Watcher(db, bus)
        sent = [0]

        def count(*_: Any) -> None:
            sent[0] += 1

        event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        pick = random.Random(args.seed)
        placed: list[str] = []
        loop_cpu: list[float] = []
        process_cpu: list[float] = []
        statements: list[int] = []
        decided: list[int] = []
        serial = passes = 0
        began = time.perf_counter()
        try:
            await reconciler.reconcile_once()  # the first pass: the cache and the session from a full read
            async def one(counted: bool) -> None:
                nonlocal serial, passes
                passes += 1
                names, sizes = [], []
                for _ in range(args.arrivals):
                    names.append(f"one-{serial:07d}")
                    sizes.append(1)
                    serial += 1
                if args.gang_every and passes % args.gang_every == 0:
                    names.append(f"gang-{serial:07d}")
                    sizes.append(pick.choice(GANG_SIZES))
                    serial += 1
                await _submit(db, names, sizes, submitted)
                gone = [placed.pop(pick.randrange(len(placed))) for _ in range(min(args.deletes, len(placed)))]
                await _delete(db, gone)
                at, thread, process = sent[0], time.thread_time(), time.process_time()
                await reconciler.reconcile_once()
                for _ in range(1000):  # the watcher takes what was published
                    await asyncio.sleep(0)
                    if not reconciler_publishing(reconciler) and bus_empty(bus):
                        break
                if counted:
                    loop_cpu.append(time.thread_time() - thread)
                    process_cpu.append(time.process_time() - process)
                    statements.append(sent[0] - at)
                    decided.append(len(names))
                placed.extend(names)

            for _ in range(args.warmup):
                await one(False)
            await asyncio.wait_for(watcher.live.wait(), 60)
            warm_s = time.perf_counter() - began
            async with recording(args.py_spy, Path(f"passes-{args.arrivals}.pyspy.txt"), rate_hz=250):
                for _ in range(args.passes):
                    await one(True)
            async with db.unit_of_work() as uow:
                stored = set((await uow.session.execute(
                    select(m.Deployment.name).join(m.Placement).where(m.Deployment.tenant_id == TENANT))).scalars())
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", count)
            await watcher.stop()
            if decider is not None:
                await asyncio.to_thread(decider.close)
        per = statistics.mean(decided)
        return {"nodes": args.nodes, "placements": args.placements, "arrivals": args.arrivals, "deletes": args.deletes,
                "gang_every": args.gang_every, "passes": args.passes, "fast_passes": reconciler.fast_passes,
                "full_passes": reconciler.full_passes, "deployments_per_pass": round(per, 2),
                "placed_of_ours": sum(1 for name in placed if name in stored), "of": len(placed),
                "watch_events": watcher.events, "warm_s": round(warm_s, 1),
                "measured_s": round(time.perf_counter() - began - warm_s, 1),
                "statements_per_pass": statistics.median(statements),
                "loop_cpu_ms_per_pass": round(statistics.median(loop_cpu) * 1000, 3),
                "loop_cpu_ms_per_deployment": round(statistics.mean(loop_cpu) * 1000 / per, 4),
                "process_cpu_ms_per_pass": round(statistics.median(process_cpu) * 1000, 3),
                "process_cpu_ms_per_deployment": round(statistics.mean(process_cpu) * 1000 / per, 4)}


def reconciler_publishing(reconciler: Any) -> bool:
    return reconciler._publisher.busy


def bus_empty(bus: Any) -> bool:
    return all(queue.empty() for queue in bus._subscribers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=4096, help=f"simulated nodes (a multiple of {NODES_PER_RACK})")
    p.add_argument("--placements", type=int, default=10000, help="running single-shard deployments on them")
    p.add_argument("--arrivals", type=int, default=32, help="single-accelerator deployments a pass decides")
    p.add_argument("--deletes", type=int, default=3, help="deployments placed earlier marked DELETING a pass")
    p.add_argument("--gang-every", type=int, default=4, help="a gang of 8..64 shards every this many passes (0: none)")
    p.add_argument("--passes", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20, help="passes first, not counted")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--decide-process", action=argparse.BooleanOptionalAction, default=True,
                   help="the warm session in a process of its own (the controller's default)")
    p.add_argument("--py-spy", metavar="PATH", help="record the measured passes with this py-spy binary "
                                                   "(passes-N.pyspy.txt in the current directory)")
    from controller.gcpolicy import configure_gc
    configure_gc()  # as `maia-controller` runs
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
