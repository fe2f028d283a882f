"""Bring the database schema to the code's revision, or refuse to run against an old one.

The controller calls `ensure_schema(db, migrate=True)` on start (the default), so a new
release upgrades its own database. With `migrate=False` (several controllers sharing one
PostgreSQL, or an operator who migrates by hand) it only checks, and a database behind the
code stops the controller with the exact command to run instead of failing later on a
missing column.

An upgrade is one transaction on either backend (`begin_sqlite_migration` for SQLite): one that
fails, or is killed, part way leaves the database at the revision it had. Only an empty database
(or Maia's own) is given the schema: one holding another application's tables and no Maia schema
version is refused (`ForeignDatabaseError`), not filled beside them.

Alembic's API is synchronous: it runs inside `AsyncConnection.run_sync` (database I/O goes
through the async driver) and script files are read in a worker thread (once per process:
`code_revisions`), so the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import logging
import functools
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from controller.store import pg_driver
from controller.store.db import Database, unreachable

log = logging.getLogger("maia.migrate")

# migrations/ sits at the repository top, beside the `controller` package (installed editable).
# Found from this file, not `controller.__file__`: under the `pytest` script (repo not on
# sys.path) tests/controller/ can make `controller` resolve as a namespace package without one.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

# Alembic's table of the revision a database is at (its default name).
VERSION_TABLE = "alembic_version"
# Tables named in a refusal, the rest counted.
_TABLES_NAMED = 3

# Serialises concurrent `ensure_schema(migrate=True)` calls of several controllers on PostgreSQL.
# `alembic upgrade` from the command line takes it too (migrations/env.py).
PG_MIGRATION_LOCK_KEY = 0x6D616961  # "maia"


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


class ForeignDatabaseError(SchemaError):
    """The database holds tables but no Maia schema version: another application's, most likely."""

    def __init__(self, url: str, tables: list[str]) -> None:
        self.tables = tables
        named = ", ".join(tables[:_TABLES_NAMED])
        if len(tables) > _TABLES_NAMED:
            named += f" and {len(tables) - _TABLES_NAMED} more"
        super().__init__(
            f"the database at {url} holds tables that are not Maia's ({named}) and no Maia schema version; "
            f"hint: give --db an empty database (Maia installs its schema only there) or Maia's own"
        )


class MigrationFailedError(SchemaError):
    """A migration's statements did not fit the database (a table in their way, a row a new
    constraint refuses); the upgrade was rolled back whole."""

    def __init__(self, url: str, current: str | None, head: str, cause: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"cannot upgrade the database at {url} from schema revision {current or '<empty: no revision>'} "
            f"to {head}: {cause}; nothing of the upgrade was kept; hint: the database differs from what its "
            f"revision says (a table, column or row made by hand or by another application is in the way): "
            f"repair that, or restore a backup, and start again"
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


async def database_revision(db: Database) -> str | None:
    """The revision the database is at now (None: none, or it could not be read): what a running
    controller's schema is no longer, once another migrated or downgraded it under it."""
    try:
        async with db.engine.connect() as conn:
            return await conn.run_sync(_current_revision)
    except (SQLAlchemyError, OSError):
        return None


# PostgreSQL: the tables and views of the current schema that no extension owns (an extension's,
# such as pg_stat_statements' views or PostGIS's spatial_ref_sys, belong to the server's setup).
_PG_OWN_RELATIONS = text("""
    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
""")


def _foreign_tables(connection: Connection) -> list[str]:
    """The tables (and views) of a database with no Maia schema version, sorted; none when it is
    empty or has a version. Tables first: one migrated meanwhile shows its version too. An
    extension's tables and views (PostgreSQL) are not an application's: a database prepared with
    `CREATE EXTENSION pg_stat_statements` is still empty."""
    if connection.dialect.name == "sqlite":
        inspector = inspect(connection)
        found = set(inspector.get_table_names()) | set(inspector.get_view_names())
    else:
        found = set(connection.execute(_PG_OWN_RELATIONS).scalars())
    names = found - {VERSION_TABLE}
    if not names or _current_revision(connection) is not None:
        return []
    return sorted(names)


def _refuse_foreign(connection: Connection, url: str) -> None:
    tables = _foreign_tables(connection)
    if tables:
        raise ForeignDatabaseError(url, tables)


def begin_sqlite_migration(connection: Connection) -> None:
    """Begin the one SQLite transaction a run of migrations goes in (`ensure_schema`, env.py).

    Python's sqlite3 (under aiosqlite) begins a transaction only before an INSERT, UPDATE or
    DELETE, so each CREATE, ALTER or DROP before a run's first version stamp was committed on its
    own: an upgrade that failed or was killed there left a later revision's tables under the older
    stamp, and every later upgrade failed on them. SQLite's DDL is transactional once BEGIN is
    sent. IMMEDIATE takes the write lock before the version is read: a concurrent upgrade (a
    controller's and `alembic upgrade`) waits for this one, then finds the schema upgraded.

    Batch migrations rebuild tables (copy, drop, rename); with foreign keys on, dropping a parent
    would cascade-delete its children. The PRAGMA does nothing inside a transaction: it comes
    first, and stays on the connection (`ensure_schema` turns it back on).
    """
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _upgrade(connection: Connection, cfg: Config, url: str) -> None:
    # Under the migration lock: a database another controller just migrated has its version now.
    _refuse_foreign(connection, url)
    # env.py runs the migrations on this connection, inside the caller's transaction.
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


# SQLite's result codes of a statement that does not fit the schema or the data (SQLITE_ERROR:
# "table t already exists", "no such column"; SQLITE_CONSTRAINT; SQLITE_MISMATCH), and PostgreSQL's
# SQLSTATE classes of the same (data exception, integrity constraint violation, syntax error or
# access rule violation, a PL/pgSQL RAISE).
_SQLITE_SCHEMA_CODES = frozenset({sqlite3.SQLITE_ERROR, sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_MISMATCH})
_PG_SCHEMA_CLASSES = frozenset({"22", "23", "42", "P0"})


def _misfit(exc: BaseException) -> bool:
    """Whether a migration failed on what the database holds (or on a check of its own), not on
    reaching or using it (a lost connection, a lock not granted, a full disk)."""
    if not isinstance(exc, DBAPIError):
        return not unreachable(exc)
    state = pg_driver.sqlstate(exc)
    if state is not None:
        return state[:2] in _PG_SCHEMA_CLASSES
    code = getattr(exc.orig, "sqlite_errorcode", None)  # an extended code: its primary one in the low byte
    return code is not None and code & 0xFF in _SQLITE_SCHEMA_CODES


async def ensure_schema(db: Database, *, migrate: bool) -> str:
    """Upgrade to head (`migrate=True`) or check that the schema is at head; return the revision.

    Raises `SchemaBehindError` when not migrating and the database is behind (or empty),
    `SchemaAheadError` when the database carries a revision this code does not know,
    `ForeignDatabaseError` when it holds tables but no version, and `MigrationFailedError` when a
    migration did not fit the database (rolled back whole; a failure to reach or use the database
    is raised as it came).
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
        url = db.engine.url.render_as_string(hide_password=True)
        if not migrate:
            await conn.run_sync(_refuse_foreign, url)
            raise SchemaBehindError(current, head)

        if is_sqlite:
            await conn.rollback()
            await conn.run_sync(begin_sqlite_migration)
        else:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
        try:
            before = await conn.run_sync(_current_revision)  # under the lock: another start may have migrated
            if before is not None and before != head and before not in revisions.known:
                # A newer controller migrated while this one waited (a rolling upgrade): told as
                # such, not as a migration that did not fit ("restore a backup").
                raise SchemaAheadError(before, head)
            await conn.run_sync(_upgrade, alembic_config(db.url), url)
            await conn.commit()
            if before != head:  # said once: an automatic migration left no trace but "schema ready"
                log.info("migrated the database from schema %s to %s", before or "none (empty)", head)
        except Exception as exc:
            if isinstance(exc, SchemaError) or not _misfit(exc):
                raise
            cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise MigrationFailedError(url, current, head, cause) from exc
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
