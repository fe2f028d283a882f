"""Writes that ride in another statement on PostgreSQL: one round trip for both.

A rider is a write whose outcome nothing in its transaction reads before the COMMIT (a submit
batch's request ids and events, a plan commit's events). On PostgreSQL it goes as a
data-modifying WITH of a statement its caller sends anyway (`audit.append(along=)`: the audit
head's compare and set and the entries), where each statement is a turn of a busy event loop;
elsewhere, or when no statement carries it, by a statement of its own (`write`). On SQLite that
one is deferred to the COMMIT anyway (`marks.deferred_writes`).

What PostgreSQL does with WITHs bounds what may ride: the carrying statement and its WITHs run
on one snapshot, in no order it promises, and the triggers they fire run at the carrier's end.
So a rider never writes a row the carrier or another rider writes, and rides only on a table
whose writes take no lock that the transaction order of store/changes.py places before the
carrier's (no triggers, no rows another writer locks: `events`, `client_requests`).
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession


class Rider(Protocol):
    @property
    def empty(self) -> bool:
        """Nothing to write."""

    def cte(self, name: str, dialect: Dialect) -> str:
        """`name AS (...)`: the write as a WITH, its parameters prefixed by `name` (`params`)."""

    def params(self, name: str, dialect: Dialect) -> dict[str, Any]:
        """The parameters of `cte(name)`."""

    async def write(self, session: AsyncSession) -> None:
        """The write by a statement of its own."""
