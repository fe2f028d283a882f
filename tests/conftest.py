"""Shared test fixtures: the databases every store/integration test runs against.

Tests that take `db_url` (an empty database) or `database` (a migrated `Database`) run twice:
on a SQLite file and on a real PostgreSQL.
PostgreSQL is a throwaway server started once per session from the local PostgreSQL 15
binaries (no Docker here), on a free port with trust auth, and stopped at the end; each test
gets a fresh database in it (CREATE DATABASE is milliseconds). `MAIA_TEST_PG_URL` points the
tests at an existing server instead. Without either, PostgreSQL cases are skipped, unless
`MAIA_REQUIRE_POSTGRES=1` (CI), where that is an error.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import make_url

from controller.store.db import Database
from controller.store.migrate import ensure_schema

PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin")
PG_USER = "app"
T = TypeVar("T")


def _find_pg_bin_dir() -> Path | None:
    override = os.environ.get("MAIA_TEST_PG_BIN")  # a specific install (or a bogus one, to test the skip)
    if override:
        d = Path(override)
        return d if (d / "initdb").exists() and (d / "pg_ctl").exists() else None
    for candidate in (*PG_BIN_DIRS, *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)):
        d = Path(candidate)
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_postgres(reason: str) -> None:
    if os.environ.get("MAIA_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"MAIA_REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable ({reason}); install postgresql-15 (make postgres) or set MAIA_TEST_PG_URL")


class _LocalPostgres:
    """A throwaway PostgreSQL cluster in a temp dir (run as `postgres` when we are root)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="maia-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.as_postgres = os.geteuid() == 0
        self._stopped = False
        # Belt and braces: stop it even if pytest dies before finalising session fixtures.
        atexit.register(self.stop)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return "<no log>"

    def start(self) -> str:
        self.data.mkdir(mode=0o700)
        if self.as_postgres:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.data, "postgres", "postgres")
        init = self._run(
            "initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-sync",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}): {init.stderr or init.stdout}")
        # Durability is worthless for a throwaway test server: turn it off for speed.
        opts = (
            f"-h 127.0.0.1 -k {self.root} -c fsync=off -c synchronous_commit=off "
            f"-c full_page_writes=off -c max_connections=200"
        )
        last_error = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            started = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", f"{opts} -p {self.port}",
                "-w", "-t", "60", "start",
            )
            if started.returncode == 0:
                return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/postgres"
            last_error = f"{started.stderr or started.stdout}\n{self._log_tail()}"
            time.sleep(0.2)
        raise RuntimeError(f"pg_ctl start failed: {last_error}")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL server's maintenance database, alive for the session."""
    external = os.environ.get("MAIA_TEST_PG_URL")
    if external:
        url = make_url(external)
        yield url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        return
    bin_dir = _find_pg_bin_dir()
    if bin_dir is None:
        where = os.environ.get("MAIA_TEST_PG_BIN") or f"{', '.join(PG_BIN_DIRS)} or on PATH"
        _no_postgres(f"no initdb/pg_ctl in {where}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _no_postgres("running as root without runuser to drop to the postgres user")
    server = _LocalPostgres(bin_dir)
    try:
        url = server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
        server.stop()
        _no_postgres(f"could not start a local server: {exc}")
    try:
        yield url
    finally:
        server.stop()


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _create_database(server_url: str, template: str | None = None, prefix: str = "maia_test") -> str:
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        if conn.get_server_version().major >= 15:
            # 15's default (WAL_LOG) copies block by block through the WAL: ~15x slower here.
            sql += " STRATEGY = FILE_COPY"
        await conn.execute(sql)
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(server_url: str, db_url: str) -> None:
    import asyncpg

    name = make_url(db_url).database
    conn = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    db = Database(url)
    try:
        await ensure_schema(db, migrate=True)
    finally:
        await db.dispose()  # a template must have no open connections


def _run_in_thread(coro_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    # For sync fixtures fetched lazily (getfixturevalue) from inside the running test loop:
    # a private loop in a worker thread does the async work.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn(*args))).result()


@pytest.fixture(scope="session")
def _postgres_template(postgres_url: str) -> Iterator[str]:
    """A database migrated once per session; each test's database is a copy of it."""
    url = _run_in_thread(_create_database, postgres_url, None, "maia_template")
    try:
        _run_in_thread(_migrate, url)
        yield make_url(url).database
    finally:
        _run_in_thread(_drop_database, postgres_url, url)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "maia.db"
    _run_in_thread(_migrate, f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: every test using db_url/database runs once per backend."""
    return request.param


@pytest.fixture
async def db_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An EMPTY database (no schema) on each backend: a SQLite file, or a fresh PG database."""
    if db_backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"
        return
    server_url = request.getfixturevalue("postgres_url")
    url = await _create_database(server_url)
    try:
        yield url
    finally:
        await _drop_database(server_url, url)


@pytest.fixture
async def database(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A `Database` migrated to head, its own fresh database on each backend; disposed after.

    Independent of `db_url` (which stays empty); the migrated database's URL is `database.url`.
    Copied from a per-session migrated template, so it costs milliseconds, not a migration.
    """
    if db_backend == "sqlite":
        path = tmp_path / "maia-migrated.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        url, server_url = f"sqlite+aiosqlite:///{path}", None
    else:
        server_url = request.getfixturevalue("postgres_url")
        url = await _create_database(server_url, template=request.getfixturevalue("_postgres_template"))
    db = Database(url)
    try:
        yield db
    finally:
        await db.dispose()
        if server_url is not None:
            await _drop_database(server_url, url)
