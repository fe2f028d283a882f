"""The database a run is on: a SQLite file or a throwaway PostgreSQL server started as the tests
start theirs (`bench/pgserver.py`), pg_stat_statements on it (`--pg-statements`), and, once the
controller has stopped, the committed state read back and graded with the test suite's checker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench.pgserver import LocalPostgres, create_database, find_pg_bin_dir


@asynccontextmanager
async def database(kind: str, root: Path) -> AsyncIterator[str]:
    """A fresh database URL: a SQLite file, or a database on a PostgreSQL started as the tests do."""
    async with database_server(kind, root) as (url, _server):
        yield url


# pg_stat_statements, loaded with --pg-statements: top-level statements only, so that their times
# add up to the server's work (a trigger's statements are in the time of the one that fired it).
PG_STATEMENTS_SETTINGS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "top",
                          "pg_stat_statements.max": "10000"}


@asynccontextmanager
async def database_server(kind: str, root: Path, *, statements: bool = False
                          ) -> AsyncIterator[tuple[str, LocalPostgres | None]]:
    """`database`'s URL and the PostgreSQL server it is on (None: SQLite), for its CPU time;
    `statements`: the server loads pg_stat_statements and the database has the extension."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{root / 'maia.db'}", None
        return
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server binaries (make postgres)")
    server = LocalPostgres(bin_dir, PG_STATEMENTS_SETTINGS if statements else None)
    try:
        url = await create_database(server.start(), prefix="maia_bench")
        if statements:
            await _pg_execute(url, "CREATE EXTENSION pg_stat_statements")
        yield url, server
    finally:
        server.stop()


async def _pg_execute(url: str, sql: str) -> list[Any]:
    """The rows of one statement on a connection of its own (the bench's, not the controller's)."""
    import asyncpg
    from bench.pgserver import asyncpg_dsn
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


PG_STATEMENTS_SQL = """
SELECT calls, rows, total_exec_time, max_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query
FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC"""
PG_XACTS_SQL = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"


async def pg_statements_since_reset(url: str, top: int) -> dict[str, Any]:
    """pg_stat_statements since its reset: totals and the `top` statements by execution time (each
    with its mean and its longest execution: a statement that waited for a lock shows in its max)."""
    rows = await _pg_execute(url, PG_STATEMENTS_SQL)
    return {"calls": sum(r["calls"] for r in rows), "exec_ms": round(sum(r["total_exec_time"] for r in rows)),
            "statements": len(rows),
            "top": [{"calls": r["calls"], "rows": r["rows"], "exec_ms": round(r["total_exec_time"], 1),
                     "mean_ms": round(r["total_exec_time"] / r["calls"], 3) if r["calls"] else 0.0,
                     "max_ms": round(r["max_exec_time"], 1), "query": r["query"]} for r in rows[:top]]}


async def grade(url: str) -> list[str]:
    """The checker's verdict on the committed state (the problem as stored, its placements as the plan)."""
    from bench.checking import check_state
    from controller.store.db import Database
    from controller.store.snapshot import load_snapshot
    db = Database(url)
    try:
        async with db.unit_of_work() as uow:
            problem = (await load_snapshot(uow.session)).problem
    finally:
        await db.dispose()
    return [str(v) for v in check_state(problem, problem["placements"])]
