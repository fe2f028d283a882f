"""The database handle and the unit of work.

`Database` owns the async engine (SQLite via aiosqlite, PostgreSQL via asyncpg);
`Database.unit_of_work()` yields a `UnitOfWork` whose changes are rolled back unless
`commit()` is called, so a failed use case never leaves anything half-written.
`Database.fenced(fence)` is the same database whose units of work run `fence.check` inside
every transaction they commit, just before it commits: the leader's writers use it, so a
controller that lost the leader lease (`controller.store.lease`) writes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

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


class Fence(Protocol):
    """Refuses (raises) inside a transaction its writer may no longer commit."""

    async def check(self, session: AsyncSession) -> None: ...


@dataclass
class UnitOfWork:
    """One transaction. Use `session` for queries; nothing persists without `commit()`."""

    session: AsyncSession
    fence: Fence | None = None

    async def commit(self) -> None:
        if self.fence is not None:  # last, so its lock is held only until the commit below
            await self.fence.check(self.session)
        # Inside an audited API call, the call's audit entry is written in this transaction.
        await audit.commit(self.session)

    async def rollback(self) -> None:
        await self.session.rollback()


class Database:
    def __init__(self, url: str = DEFAULT_DB_URL) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.fence: Fence | None = None

    def fenced(self, fence: Fence) -> Database:
        """This database (same engine) with every commit checked by `fence` first."""
        view = copy.copy(self)
        view.fence = fence
        return view

    @property
    def is_sqlite(self) -> bool:
        return _is_sqlite(self.url)

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        async with self._sessions() as session:
            uow = UnitOfWork(session, self.fence)
            try:
                yield uow
            finally:
                # Anything not committed is discarded (no-op after a commit).
                await session.rollback()

    async def dispose(self) -> None:
        await self.engine.dispose()
