"""Alembic environment: one async env for SQLite (aiosqlite) and PostgreSQL (asyncpg).

Two ways in:
- programmatic (`controller.store.migrate.ensure_schema`): the caller passes an open sync
  `Connection` in `config.attributes["connection"]` and owns its transaction;
- command line (`alembic upgrade head`): an async engine is created for the URL found in
  `config.attributes["db_url"]`, `-x db=URL`, `$MAIA_DB_URL`, then the controller default.

Either way every migration of one command runs in one transaction, committed at the end: an
upgrade that fails or is killed part way leaves the database at the revision it had, whole, on
SQLite too (`migrate.begin_sqlite_migration`), as PostgreSQL's transactional DDL always did.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from controller.store.db import DEFAULT_DB_URL, create_engine
from controller.store.migrate import PG_MIGRATION_LOCK_KEY, begin_sqlite_migration
from controller.store.models import Base

config = context.config
target_metadata = Base.metadata

# Only the command line configures logging; the controller keeps its own.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)


def database_url() -> str:
    return (
        config.attributes.get("db_url")
        or context.get_x_argument(as_dictionary=True).get("db")
        or os.environ.get("MAIA_DB_URL")
        or config.get_main_option("sqlalchemy.url")
        or DEFAULT_DB_URL
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) instead of running it: PostgreSQL only.
    SQLite's migrations rebuild tables in batch mode, and some read rows (0024), both of which need
    the live database: refused at once with a message, not failed halfway through the script."""
    url = database_url()
    if url.startswith("sqlite"):
        raise SystemExit("alembic --sql (offline SQL) is for PostgreSQL only: SQLite's migrations rebuild "
                         "tables and read rows from the live database; run them against it instead "
                         "(alembic upgrade head, or maia-controller --migrate)")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    if not connection.in_transaction():  # the command line's own connection; ensure_schema's is in
        if is_sqlite:                     # its transaction already, under the lock below
            begin_sqlite_migration(connection)
        else:  # as a starting controller takes it: a Job's upgrade and a controller's never run at once
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(url: str) -> None:
    # The controller's own engine factory: same driver settings as at run time.
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations(database_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
