"""The database handle and the unit of work.

`Database` owns the async engine (SQLite via aiosqlite, PostgreSQL via asyncpg);
`Database.unit_of_work()` yields a `UnitOfWork` whose changes are rolled back unless
`commit()` is called, so a failed use case never leaves anything half-written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from controller.store import audit

DEFAULT_DB_URL = "sqlite+aiosqlite:///maia.db"


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str) -> AsyncEngine:
    """An engine with the settings each backend needs (SQLite: WAL, FKs on, busy timeout)."""
    if _is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


@dataclass
class UnitOfWork:
    """One transaction. Use `session` for queries; nothing persists without `commit()`."""

    session: AsyncSession

    async def commit(self) -> None:
        # Inside an audited API call, the call's audit entry is written in this transaction.
        await audit.commit(self.session)

    async def rollback(self) -> None:
        await self.session.rollback()


class Database:
    def __init__(self, url: str = DEFAULT_DB_URL) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        async with self._sessions() as session:
            uow = UnitOfWork(session)
            try:
                yield uow
            finally:
                # Anything not committed is discarded (no-op after a commit).
                await session.rollback()

    async def dispose(self) -> None:
        await self.engine.dispose()
