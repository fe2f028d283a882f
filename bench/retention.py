"""Retention's batches on a large events table (`--event-ttl`) or audit log (`--table audit`,
`--audit-ttl`; controller/retention.py).

`python -m bench.retention --rows 400000 --db sqlite postgres`: a fresh database of each kind
(SQLite in a temp dir, a throwaway PostgreSQL of bench/pgserver.py) gets `--rows` events spread
evenly over the last ten days, in the shapes the controller writes; then the deletion of those
older than seven days, `controller.store.retention.prune_events` a batch of 500 at a time as the
leader's task runs it (each reading on from where the last stopped; without its pauses), each
batch timed as the transaction a writer waits behind; then one prune with nothing due, what the
leader pays every minute once caught up. `--hold-snapshot`: the same with an old snapshot open
on PostgreSQL, which keeps the deleted rows' index entries. `--table audit`: the same with
`--rows` audit entries, one chain (appended as the controller appends them, a time each 2,000),
deleted by `controller.store.audit.prune` (each batch re-hashed, the chain's base moved along),
and the chain verified after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.e2e.databases import database_server
from controller.retention import BATCH_ROWS
from controller.store import audit, migrate
from controller.store.db import Database
from controller.store.models import Event, utcnow
from controller.store.retention import Pruned, prune_events
from controller.store.unnest import InsertRows

SPAN_DAYS = 10
TTL_DAYS = 7
WRITE_CHUNK = 20_000
AUDIT_CHUNK = 2_000  # entries an append: one time for them all


@asynccontextmanager
async def _database(kind: str) -> AsyncIterator[Database]:
    """A fresh database of `kind` at the schema's head (`bench.e2e`'s server: a SQLite file in a
    temp dir, or a throwaway PostgreSQL), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="maia-bench-retention-"))
    try:
        async with database_server(kind, folder) as (url, _server):
            db = Database(url)
            try:
                await migrate.ensure_schema(db, migrate=True)
                yield db
            finally:
                await db.dispose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _fill(db: Database, rows: int) -> None:
    """`rows` events, oldest first, evenly over the last SPAN_DAYS: two of three a shard's start,
    one a placement, on 8 tenants' deployments."""
    now = utcnow()
    for start in range(0, rows, WRITE_CHUNK):
        chunk = [{"at": now - timedelta(days=SPAN_DAYS * (1 - i / rows)), "actor": "system",
                  "kind": "shard.running" if i % 3 else "deployment.placed", "object_kind": "deployment",
                  "object_id": f"t{i % 8}/d{i}", "message": f"replica 0 shard 0 placed on n{i % 4096}",
                  "data": {"replica": 0, "shard": 0, "node": f"n{i % 4096}"}}
                 for i in range(start, min(rows, start + WRITE_CHUNK))]
        async with db.unit_of_work() as uow:
            await InsertRows(Event.__table__, chunk).write(uow.session)
            await uow.commit()


async def _fill_audit(db: Database, rows: int) -> None:
    """`rows` audit entries in one chain, oldest first, evenly over the last SPAN_DAYS: submits of
    8 tenants' deployments, as the API's interceptor writes them."""
    now = utcnow()
    for start in range(0, rows, AUDIT_CHUNK):
        chunk = [audit.AuditRecord(actor=f"token-{i % 8}", role="tenant", tenant=f"t{i % 8}",
                                   action="/maia.v1.DeploymentService/SubmitDeployment", object_kind="deployment",
                                   object_id=f"t{i % 8}/d{i}", request_id=f"req-{i}", detail={"token_id": f"k{i % 8}"})
                 for i in range(start, min(rows, start + AUDIT_CHUNK))]
        async with db.unit_of_work() as uow:
            await audit.append(uow.session, chunk, at=now - timedelta(days=SPAN_DAYS * (1 - start / rows)))
            await uow.commit()


# What `--table` fills and deletes with: (fill, a batch's prune, what the rows are called).
TABLES = {"events": (_fill, prune_events, "events"), "audit": (_fill_audit, audit.prune, "audit entries")}


async def _prune(db: Database, table: str, before: Any, since: Any) -> tuple[Pruned, float]:
    started = time.perf_counter()
    async with db.unit_of_work() as uow:
        pruned = await TABLES[table][1](uow.session, before, BATCH_ROWS, since=since)
        await uow.commit()
    return pruned, (time.perf_counter() - started) * 1000


@asynccontextmanager
async def _snapshot_held(db: Database, hold: bool) -> AsyncIterator[None]:
    """With `hold` on PostgreSQL: a REPEATABLE READ transaction open (its snapshot taken) on a
    connection of its own meanwhile, as a dump's or a long report's, which keeps every row version
    deleted since, and its index entries, from being dropped."""
    if not hold or db.is_sqlite:
        yield
        return
    async with db.engine.connect() as conn:
        # The first statement of the transaction the driver begins (as `Database.read_snapshot`);
        # no idle-in-transaction timeout (the engine's ends an idle transaction after seconds).
        await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await conn.exec_driver_sql("SET idle_in_transaction_session_timeout = 0")
        await conn.exec_driver_sql("SELECT count(*) FROM events")
        held = (await conn.exec_driver_sql(
            "SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()")).scalar()
        if not held:
            raise RuntimeError("the snapshot is not held: this connection's transaction keeps no xmin")
        try:
            yield
        finally:
            await conn.rollback()


async def run(kind: str, rows: int, *, hold_snapshot: bool = False, table: str = "events") -> dict[str, Any]:
    async with _database(kind) as db:
        started = time.perf_counter()
        await TABLES[table][0](db, rows)
        filled_s = time.perf_counter() - started
        before = utcnow() - timedelta(days=TTL_DAYS)
        deleted, batches, reached = 0, [], None
        async with _snapshot_held(db, hold_snapshot):
            while True:
                pruned, ms = await _prune(db, table, before, reached)
                deleted += pruned.count
                reached = pruned.reached or reached
                batches.append(ms)
                if pruned.count < BATCH_ROWS:
                    break
            _, idle_ms = await _prune(db, table, before, reached)
        intact = None
        if table == "audit":
            async with db.read_snapshot() as session:
                intact = (await audit.verify_chain(session)).intact
        in_order = list(batches)
        batches.sort()
        return {"db": kind, "table": table, "rows": rows, "filled_s": round(filled_s, 1), "deleted": deleted,
                "intact_after": intact,
                "snapshot_held": hold_snapshot and kind == "postgres",
                "batches": len(batches), "batch_p50_ms": round(statistics.median(batches), 1),
                "batch_p90_ms": round(batches[int(len(batches) * 0.9)], 1), "batch_max_ms": round(batches[-1], 1),
                # the first and the last ten batches' means: batches that grow with the rows deleted show here
                "first_10_ms": round(statistics.mean(in_order[:10]), 1),
                "last_10_ms": round(statistics.mean(in_order[-10:]), 1),
                "deleted_per_s_of_batches": round(deleted / (sum(batches) / 1000)) if deleted else 0,
                "nothing_due_ms": round(idle_ms, 2)}


def _report(r: dict[str, Any]) -> str:
    what = TABLES[r["table"]][2]
    return (f"{r['db']:10} {r['rows']} {what} over {SPAN_DAYS} days (written in {r['filled_s']} s): "
            f"{r['deleted']} past {TTL_DAYS} days deleted in {r['batches']} batches of {BATCH_ROWS}, a batch "
            f"p50/p90/max {r['batch_p50_ms']}/{r['batch_p90_ms']}/{r['batch_max_ms']} ms, the first and last "
            f"ten {r['first_10_ms']}/{r['last_10_ms']} ms"
            + (", a snapshot held open meanwhile" if r["snapshot_held"] else "") + " "
            f"({r['deleted_per_s_of_batches']} rows a second of batches); a prune with nothing due "
            f"{r['nothing_due_ms']} ms"
            + ("" if r["intact_after"] is None else
               "; the chain verifies after" if r["intact_after"] else "; THE CHAIN IS BROKEN after"))


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for kind in args.db:
        results.append(await run(kind, args.rows, hold_snapshot=args.hold_snapshot, table=args.table))
        print(_report(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="rows written before the deletion")
    parser.add_argument("--db", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"])
    parser.add_argument("--hold-snapshot", action="store_true",
                        help="PostgreSQL: a REPEATABLE READ transaction held open through the deletion (a dump's)")
    parser.add_argument("--table", choices=sorted(TABLES), default="events",
                        help="the events (--event-ttl) or the audit log (--audit-ttl)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = asyncio.run(_main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
