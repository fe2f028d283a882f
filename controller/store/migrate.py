"""Bring the database schema to the code's revision, or refuse to run against an old one.

The controller calls `ensure_schema(db, migrate=True)` on start (the default), so a new
release upgrades its own database. With `migrate=False` (several controllers sharing one
PostgreSQL, or an operator who migrates by hand) it only checks, and a database behind the
code stops the controller with the exact command to run instead of failing later on a
missing column.

Alembic's API is synchronous: it runs inside `AsyncConnection.run_sync` (database I/O goes
through the async driver) and script files are read in a worker thread (once per process:
`code_revisions`), so the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from controller.store.db import Database

# migrations/ sits at the repository top, beside the `controller` package (installed editable).
# Found from this file, not `controller.__file__`: under the `pytest` script (repo not on
# sys.path) tests/controller/ can make `controller` resolve as a namespace package without one.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

# Serialises concurrent `ensure_schema(migrate=True)` calls of several controllers on PostgreSQL.
_PG_MIGRATION_LOCK_KEY = 0x6D616961  # "maia"


class SchemaError(RuntimeError):
    """The database schema does not match this code's head revision."""


class SchemaBehindError(SchemaError):
    """The database schema is older than this code expects (and migrating was not allowed)."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database schema is at revision {current or '<empty: no revision>'} but this controller "
            f"needs head revision {head}; run `maia-controller --migrate` (or `alembic upgrade head` "
            f"from the repository top, with -x db=URL or MAIA_DB_URL) to upgrade it"
        )


class SchemaAheadError(SchemaError):
    """The database carries a revision this code does not know: a newer controller migrated it."""

    def __init__(self, current: str, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database schema is at revision {current}, unknown to this controller (its head is {head}); "
            f"a newer controller has migrated this database: run that version"
        )


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the repository's migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["configure_logger"] = False
    if url is not None:
        cfg.attributes["db_url"] = url
    return cfg


@dataclass(frozen=True)
class Revisions:
    """This code's migrations: the newest revision and every one it knows."""

    head: str
    known: frozenset[str]


@functools.cache
def code_revisions() -> Revisions:
    """The revisions in migrations/, read once per process: they are this code's, and reading
    them runs every revision file (0.1-0.3 s, in front of every `ensure_schema`: the test suite
    starts hundreds of controllers in one process). Reads files: call from a thread in async code
    the first time."""
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revisions found under {MIGRATIONS_DIR}")
    return Revisions(head, frozenset(script.revision for script in scripts.walk_revisions()))


def head_revision() -> str:
    """The newest revision in migrations/ (`code_revisions`)."""
    return code_revisions().head


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection, cfg: Config) -> None:
    # env.py runs the migrations on this connection, inside the caller's transaction.
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def ensure_schema(db: Database, *, migrate: bool) -> str:
    """Upgrade to head (`migrate=True`) or check that the schema is at head; return the revision.

    Raises `SchemaBehindError` when not migrating and the database is behind (or empty), and
    `SchemaAheadError` when the database carries a revision this code does not know.
    """
    revisions = await asyncio.to_thread(code_revisions)
    head = revisions.head
    is_sqlite = db.engine.dialect.name == "sqlite"
    async with db.engine.connect() as conn:
        current = await conn.run_sync(_current_revision)
        if current is not None and current != head and current not in revisions.known:
            raise SchemaAheadError(current, head)
        if current == head:
            return current
        if not migrate:
            raise SchemaBehindError(current, head)

        if is_sqlite:
            # Batch migrations rebuild tables; with foreign keys on, dropping a parent would
            # cascade-delete its children. Only effective outside a transaction: issue it first.
            await conn.rollback()
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        else:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
        try:
            await conn.run_sync(_upgrade, alembic_config(db.url))
            await conn.commit()
        finally:
            if is_sqlite:
                await conn.rollback()
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()
        current = await conn.run_sync(_current_revision)
        await conn.commit()
    if current != head:  # pragma: no cover - alembic upgraded to something else
        raise SchemaBehindError(current, head)
    return current
