"""Shared test fixtures: the databases every store/integration test runs against.

Tests that take `db_url` (an empty database), `database` (a migrated `Database`) or
`migrated_db_url` (its URL, for a controller a test starts itself) run twice:
on a SQLite file and on a real PostgreSQL. `module_database` is a migrated `Database` shared by
the tests of one module (per backend), for tests that write nothing.
PostgreSQL is a throwaway server started once per session from the local PostgreSQL 15
binaries (no Docker here), on a free port with trust auth, and stopped at the end; each test
gets a fresh database in it, never used before. A PostgreSQL CREATE DATABASE costs 0.3-0.9 s on
the 2-core CI host (more than many tests), so a worker thread makes each kind of database (empty,
or a copy of the migrated template) a couple of tests ahead, and drops used ones behind, while
the tests run (`_DatabaseMaker`). `MAIA_TEST_PG_URL` points the
tests at an existing server instead. Without either, PostgreSQL cases are skipped, unless
`MAIA_REQUIRE_POSTGRES=1` (CI), where that is an error.

Property tests (Hypothesis) explore new random examples on every local run, which is how they
find bugs. `HYPOTHESIS_PROFILE=ci` (set by `.ci/run`) makes them derandomized and free of the
local example database instead, so CI's verdict is the same on every run of one commit; a new
counterexample found locally is pinned with `@example` when it is fixed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import settings
from sqlalchemy.engine import make_url

from controller.store.db import Database
from bench.pgserver import PG_BIN_DIRS, LocalPostgres, create_database, drop_database, find_pg_bin_dir
from controller.store.migrate import ensure_schema
# No per-example deadline in CI: a loaded host's pause would fail an example as too slow (Flaky).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

T = TypeVar("T")


def _no_postgres(reason: str) -> None:
    if os.environ.get("MAIA_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"MAIA_REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable ({reason}); install postgresql-15 (make postgres) or set MAIA_TEST_PG_URL")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL server's maintenance database, alive for the session."""
    external = os.environ.get("MAIA_TEST_PG_URL")
    if external:
        url = make_url(external)
        yield url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        return
    bin_dir = find_pg_bin_dir()
    if bin_dir is None:
        where = os.environ.get("MAIA_TEST_PG_BIN") or f"{', '.join(PG_BIN_DIRS)} or on PATH"
        _no_postgres(f"no initdb/pg_ctl in {where}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _no_postgres("running as root without runuser to drop to the postgres user")
    server = LocalPostgres(bin_dir)
    try:
        url = server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
        server.stop()
        _no_postgres(f"could not start a local server: {exc}")
    try:
        yield url
    finally:
        server.stop()


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
    url = _run_in_thread(create_database, postgres_url, None, "maia_template")
    try:
        _run_in_thread(_migrate, url)
        yield make_url(url).database
    finally:
        _run_in_thread(_drop_or_warn, postgres_url, url)


# Taken before any test runs: tests monkeypatch `asyncpg.connect` (tests/store/test_notify.py), and
# `_DatabaseMaker`'s thread works while they run; it must neither see their stand-ins nor be seen.
_PG_CONNECT = asyncpg.connect


class _DatabaseMaker:
    """Fresh PostgreSQL databases (copies of `template`, or empty without one) made `ahead` tests
    in advance on a worker thread of its own, and dropped there after use, so that a test waits
    for neither. Each database serves one test; made and dropped in the order asked."""

    def __init__(self, server_url: str, template: str | None, ahead: int = 2) -> None:
        self._server_url = server_url
        self._template = template
        self._ahead = ahead
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-databases")
        self._made: deque[Future[str]] = deque()
        self._dropped: list[Future[None]] = []

    def _make(self) -> None:
        self._made.append(self._thread.submit(
            asyncio.run, create_database(self._server_url, self._template, connect=_PG_CONNECT)))

    async def take(self) -> str:
        """The URL of a database no test has used; the next ones start being made."""
        while len(self._made) <= self._ahead:
            self._make()
        return await asyncio.wrap_future(self._made.popleft())

    def drop(self, url: str) -> None:
        self._dropped.append(self._thread.submit(asyncio.run, _drop_or_warn(self._server_url, url)))

    def close(self) -> None:
        """Drop the databases made and not taken; wait for every drop."""
        for made in self._made:
            try:
                self.drop(made.result())
            except Exception:  # noqa: BLE001 - a make that failed left nothing to drop
                pass
        self._thread.shutdown(wait=True)
        for dropped in self._dropped:
            dropped.result()


async def _drop_or_warn(server_url: str, url: str) -> None:
    """Drop a test's database; one that cannot be dropped is a warning, not an error: these drops
    run at the session's end too, and a failure there was reported as an ERROR of whichever test
    the worker ran last, a test that had passed (a TimeoutError once, on a loaded machine:
    asyncpg's 60 s connect timeout is the only bounded wait on that path). The local server's files are removed after the session anyway; on an external
    server (`MAIA_TEST_PG_URL`) the warning names what is left."""
    try:
        await drop_database(server_url, url, connect=_PG_CONNECT)
    except Exception as exc:  # noqa: BLE001 - reported, never a test's failure
        warnings.warn(f"test database {make_url(url).database} not dropped: {exc!r}", stacklevel=1)


@pytest.fixture(scope="session")
def _postgres_empty_databases(postgres_url: str) -> Iterator[_DatabaseMaker]:
    maker = _DatabaseMaker(postgres_url, None)
    yield maker
    maker.close()


@pytest.fixture(scope="session")
def _postgres_migrated_databases(postgres_url: str, _postgres_template: str) -> Iterator[_DatabaseMaker]:
    maker = _DatabaseMaker(postgres_url, _postgres_template)
    yield maker
    maker.close()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "maia.db"
    _run_in_thread(_migrate, f"sqlite+aiosqlite:///{path}")
    return path


# The backends every test of `db_url`/`database`/`module_database` runs on.
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """The backend under test: every test using db_url/database runs once per backend."""
    return request.param


@pytest.fixture
async def db_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An EMPTY database (no schema) on each backend: a SQLite file, or a fresh PG database."""
    if db_backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"
        return
    maker: _DatabaseMaker = request.getfixturevalue("_postgres_empty_databases")
    url = await maker.take()
    try:
        yield url
    finally:
        maker.drop(url)


@asynccontextmanager
async def _migrated_database(backend: str, request: pytest.FixtureRequest, folder: Path) -> AsyncIterator[Database]:
    """A `Database` migrated to head, a fresh database of its own on `backend` (a SQLite file in
    `folder`); disposed (and on PostgreSQL dropped) after."""
    maker: _DatabaseMaker | None = None
    if backend == "sqlite":
        path = folder / "maia-migrated.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        url = f"sqlite+aiosqlite:///{path}"
    else:
        maker = request.getfixturevalue("_postgres_migrated_databases")
        url = await maker.take()
    db = Database(url)
    try:
        yield db
    finally:
        await db.dispose()
        if maker is not None:
            maker.drop(url)


@pytest.fixture
async def database(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A `Database` migrated to head, its own fresh database on each backend; disposed after.

    Independent of `db_url` (which stays empty); the migrated database's URL is `database.url`.
    Copied from a per-session migrated template (on PostgreSQL ahead of the test, see
    `_DatabaseMaker`), so it costs milliseconds, not a migration.
    """
    async with _migrated_database(db_backend, request, tmp_path) as db:
        yield db


@pytest.fixture
def migrated_db_url(database: Database) -> str:
    """`database`'s URL alone: a migrated database of the test's own on each backend, for a
    controller the test starts itself (on `db_url` its start migrated an empty one: 0.25 s of CPU
    on SQLite, more on PostgreSQL, in hundreds of tests about something else). A test about
    starting on an empty database takes `db_url`."""
    return database.url


@pytest.fixture(scope="module", params=BACKENDS)
async def module_database(request: pytest.FixtureRequest,
                          tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    """`database`, but one per module and backend, shared by the module's tests that use it: only
    for tests that write nothing (tests/integration's `shared_seeded`, which checks that)."""
    async with _migrated_database(request.param, request, tmp_path_factory.mktemp("module-db")) as db:
        yield db


@pytest.fixture
def socket_tmp() -> Iterator[Path]:
    """A new directory right under /tmp, removed after the test, for unix sockets: their paths must
    fit in 107 bytes, which pytest's tmp_path (/tmp/pytest-of-<user>/pytest-<n>/popen-gw<k>/<test>)
    outgrows as its run counter and test names grow."""
    directory = Path(tempfile.mkdtemp(prefix="maia-t-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
