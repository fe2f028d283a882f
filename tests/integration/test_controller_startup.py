"""`maia-controller` refuses bad --db and --listen values with one line, a hint and exit code 2,
before touching the database: each case runs the real binary in an empty folder and checks that
nothing was created there (and that an existing file was left byte for byte)."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

BIN = Path(sys.executable).parent / "maia-controller"


def run_controller(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("maia-controller: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "; hint: " in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("db, fragments", [
    ("garbage", ["--db 'garbage' is not a database URL", "sqlite+aiosqlite:///maia.db"]),
    ("sqlite:///x.db", ["synchronous driver (sqlite)", "hint: use --db sqlite+aiosqlite:///x.db"]),
    ("postgresql://app@localhost/maia", ["hint: use --db postgresql+asyncpg://app@localhost/maia"]),
    ("sqlite+aiosqlite:///missing/dir/x.db", ["folder", "missing/dir does not exist", "mkdir -p"]),
    ("mysql+aiomysql://u@h/db", ["unsupported driver 'mysql+aiomysql'", "sqlite+aiosqlite, postgresql+asyncpg"]),
    ("sqlite+aiosqlite://", ["in-memory SQLite database"]),
    ("sqlite+aiosqlite:///notes.txt", ["notes.txt exists and is not an SQLite database", "left untouched"]),
])
def test_bad_db_urls_exit_2_with_one_line_and_write_nothing(tmp_path: Path, db: str, fragments: list[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a database\n")
    before = files_in(tmp_path)
    assert_refused(run_controller(tmp_path, "--listen", "127.0.0.1:0", "--db", db), *fragments)
    assert files_in(tmp_path) == before


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    port = closed_port()
    proc = run_controller(tmp_path, "--listen", "127.0.0.1:0", "--db", f"postgresql+asyncpg://app@127.0.0.1:{port}/x",
                          "--db-wait", "0")
    assert_refused(proc, f"cannot use the database at postgresql+asyncpg://app@127.0.0.1:{port}/x",
                   "check that it is running")


async def _controller(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(str(BIN), "--listen", "127.0.0.1:0", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _waiting(proc: asyncio.subprocess.Process) -> str:
    """The controller's first log line saying it waits for its database (within 30 s)."""
    async with asyncio.timeout(30):
        while b"cannot be reached yet" not in (line := await proc.stderr.readline()):  # type: ignore[union-attr]
            assert line, "the controller ended without waiting for its database"
    return line.decode()


async def _forward(upstream: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection piped to `upstream` and back (the database server, come up at last)."""
    up_reader, up_writer = await asyncio.open_connection(*upstream)

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        sink.close()

    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


async def test_a_postgres_server_that_comes_up_within_db_wait_is_waited_for(request: pytest.FixtureRequest) -> None:
    """Started before its database server (compose, a reboot, a failover of the database), the
    controller waited for nothing: it exited 2 at the first refused connection, and only a
    supervisor's restart brought it up. It now tries again for --db-wait, answering "starting"."""
    maker = request.getfixturevalue("_postgres_migrated_databases")
    url = make_url(await maker.take())
    port = closed_port()
    proc = await _controller("--db", url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False),
                             "--db-wait", "60")
    try:
        assert "(--db-wait)" in await _waiting(proc)
        server = await asyncio.start_server(functools.partial(_forward, (url.host, url.port)), "127.0.0.1", port)
        async with server, asyncio.timeout(60):
            line = await proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith(b"maia-controller listening on "), line
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        maker.drop(url.render_as_string(hide_password=False))


async def test_a_stop_while_waiting_for_the_database_exits_0_at_once() -> None:
    proc = await _controller("--db", f"postgresql+asyncpg://app@127.0.0.1:{closed_port()}/x", "--db-wait", "600")
    try:
        await _waiting(proc)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):  # not the 600 s of its wait
            assert await proc.wait() == 0
        assert await proc.stdout.read() == b""  # type: ignore[union-attr]  # never said it listens
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_stop_while_another_controller_migrates_exits_0_at_once_and_migrates_nothing(
        request: pytest.FixtureRequest) -> None:
    """A controller starting on a database that another one is migrating waits for the migration
    lock; a SIGTERM (an operator's ^C) meanwhile stopped nothing until that migration ended. It
    now exits 0 at once, having said it listens nowhere and migrated nothing."""
    import asyncpg

    from bench.pgserver import asyncpg_dsn
    from controller.store.migrate import PG_MIGRATION_LOCK_KEY

    maker = request.getfixturevalue("_postgres_empty_databases")
    url = await maker.take()
    holder = await asyncpg.connect(asyncpg_dsn(url))
    proc = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", PG_MIGRATION_LOCK_KEY)  # another start migrating
        proc = await _controller("--db", url)
        async with asyncio.timeout(30):
            while not await holder.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                            "AND NOT granted"):
                assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):  # not until the lock is let go
            assert await proc.wait() == 0, await proc.stderr.read()  # type: ignore[union-attr]
        assert await proc.stdout.read() == b""  # type: ignore[union-attr]  # never said it listens
        assert await holder.fetchval("SELECT to_regclass('alembic_version')") is None
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await holder.close()
        maker.drop(url)


def test_a_database_that_does_not_exist_is_not_waited_for(tmp_path: Path, postgres_url: str) -> None:
    """What waiting cannot cure (a database name that does not exist here) exits at once."""
    url = make_url(postgres_url).set(database="no_such_database_here")
    proc = run_controller(tmp_path, "--listen", "127.0.0.1:0", "--db", url.render_as_string(hide_password=False),
                          "--db-wait", "600")
    assert_refused(proc, "cannot use the database at", "no_such_database_here")


@pytest.mark.parametrize("listen, fragment", [
    ("nonsense", "--listen 'nonsense' is not HOST:PORT"),
    ("127.0.0.1:70000", "port 70000 is out of range"),
    (":50051", "is not HOST:PORT"),
    ("host.invalid:50051", "cannot resolve host 'host.invalid'"),
])
def test_malformed_listen_addresses_exit_2_and_write_nothing(tmp_path: Path, listen: str, fragment: str) -> None:
    assert_refused(run_controller(tmp_path, "--listen", listen, "--db", "sqlite+aiosqlite:///maia.db"), fragment)
    assert files_in(tmp_path) == {}



def test_a_port_in_use_is_named_before_the_database_is_created(tmp_path: Path, busy_port: int) -> None:
    proc = run_controller(tmp_path, "--listen", f"127.0.0.1:{busy_port}", "--db", "sqlite+aiosqlite:///maia.db")
    assert_refused(proc, f"port {busy_port} is already in use on 127.0.0.1", "--listen 127.0.0.1:0")
    assert files_in(tmp_path) == {}


def test_a_second_controller_cannot_share_the_port(tmp_path: Path) -> None:
    first = subprocess.Popen([str(BIN), "--listen", "127.0.0.1:0", "--db", "sqlite+aiosqlite:///one.db"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = first.stdout.readline().strip()
        port = int(line.rsplit(":", 1)[1])
        (tmp_path / "two").mkdir()
        proc = run_controller(tmp_path / "two", "--listen", f"127.0.0.1:{port}", "--db", "sqlite+aiosqlite:///two.db")
        assert_refused(proc, f"port {port} is already in use")
        assert files_in(tmp_path / "two") == {}
    finally:
        first.terminate()
        first.wait(timeout=30)


def test_help_gives_every_flag_a_text_and_version_prints_one(tmp_path: Path) -> None:
    help_text = run_controller(tmp_path, "--help").stdout
    for flag, unit in [("--listen", "HOST:PORT"), ("--db", "URL"), ("--reconcile-interval", "SECONDS"),
                       ("--heartbeat-timeout", "SECONDS"), ("--solve-time-limit-ms", "MS"), ("--log-level", "")]:
        assert f"{flag} {unit}".strip() in help_text
    assert "seconds between reconcile passes" in help_text and "milliseconds the solver" in help_text
    version = run_controller(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("maia-controller 0.")


def test_a_second_controller_on_one_sqlite_file_refuses_and_a_crashed_ones_successor_starts(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}"
    args = ("--listen", "127.0.0.1:0", "--db", db, "--insecure-no-auth")

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([str(BIN), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("maia-controller listening on ")
        return proc

    first = start()
    try:
        second = run_controller(tmp_path, *args)
        assert_refused(second, f"another maia-controller (pid {first.pid}) is running on the SQLite database",
                       "maia.db.lock", "PostgreSQL")
        first.kill()  # kill -9: the kernel drops its lock; its lease row still looks live
        first.wait(10)
        successor = start()  # takes the file and the lease at once, without waiting for the expiry
        successor.terminate()
        assert successor.wait(30) == 0
    finally:
        first.kill()
        first.wait(10)


def _sqlite_tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_another_applications_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    """The default --migrate installed Maia's tables beside another application's."""
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT); "
                           "INSERT INTO customers VALUES (1, 'x');")
    proc = run_controller(tmp_path, "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{path}")
    assert_refused(proc, f"the database at sqlite+aiosqlite:///{path} holds tables that are not Maia's (customers) "
                         "and no Maia schema version", "empty database")
    assert _sqlite_tables(path) == {"customers"}


def test_a_migration_that_fails_on_start_is_undone_and_named_as_one(tmp_path: Path) -> None:
    """A migration failed on a table in its way (made by hand, here): each start said to check that the
    database was reachable, and the first left tables of later revisions behind under revision 0001, on
    which every later start failed differently ("table audit_log already exists")."""
    from alembic import command

    from controller.store.migrate import alembic_config

    path = tmp_path / "maia.db"
    command.upgrade(alembic_config(f"sqlite+aiosqlite:///{path}"), "0001_initial")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE known_tenants (id TEXT PRIMARY KEY)")  # 0027's table
    tables = _sqlite_tables(path)
    for _ in range(2):
        proc = run_controller(tmp_path, "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{path}")
        assert_refused(proc, "cannot upgrade the database", "from schema revision 0001_initial",
                       "table known_tenants already exists", "nothing of the upgrade was kept")
        assert "reachable" not in proc.stderr
        assert _sqlite_tables(path) == tables


@pytest.mark.parametrize("others", [
    ["--metrics-listen", "127.0.0.1:{port}"],
    ["--http-listen", "127.0.0.1:{port}"],
    ["--metrics-listen", "0.0.0.0:{port}"],
    ["--metrics-listen", "127.0.0.1:0", "--http-listen", "[::]:{port}"],
])
def test_two_listen_flags_on_one_port_are_refused_before_the_database_is_created(tmp_path: Path,
                                                                                 others: list[str]) -> None:
    """Found only once the database was created and migrated, and reported as the database's."""
    port = closed_port()
    proc = run_controller(tmp_path, "--listen", f"127.0.0.1:{port}", "--db", "sqlite+aiosqlite:///maia.db",
                          *(arg.format(port=port) for arg in others))
    assert_refused(proc, f"and --listen 127.0.0.1:{port} ask for the same port {port}", "give each its own port")
    assert files_in(tmp_path) == {}


@pytest.mark.parametrize("missing, fragment", [
    ("cert.pem", "--tls-cert {folder}/cert.pem: cannot read it: No such file or directory"),
    ("key.pem", "--tls-key {folder}/key.pem: cannot read it: No such file or directory"),
])
def test_a_tls_file_that_cannot_be_read_is_named_with_its_flag(tmp_path: Path, missing: str, fragment: str) -> None:
    """It was "cannot use the database at ...: cannot read TLS file ...; hint: check that it is running"."""
    for name in ("cert.pem", "key.pem"):
        if name != missing:
            (tmp_path / name).write_text("-----BEGIN NOTHING-----\n")
    before = files_in(tmp_path)
    proc = run_controller(tmp_path, "--listen", "127.0.0.1:0", "--db", "sqlite+aiosqlite:///maia.db",
                          "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    assert_refused(proc, fragment.format(folder=tmp_path))
    assert "database" not in proc.stderr
    assert files_in(tmp_path) == before


def test_a_token_file_that_cannot_be_written_creates_no_token_and_the_next_start_writes_one(tmp_path: Path) -> None:
    """A token committed before its file was written was one nobody held: every later start left the
    file alone ("the database already has an active admin token"), and only --insecure-no-auth got in."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    args = ("--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path / 'maia.db'}", "--log-level", "WARNING")
    proc = run_controller(tmp_path, *args, "--bootstrap-admin-token-file", str(folder))
    assert_refused(proc, f"--bootstrap-admin-token-file: cannot write {folder}: Is a directory",
                   "no token was created")
    assert "database" not in proc.stderr

    path = tmp_path / "admin.token"
    again = subprocess.Popen([str(BIN), *args, "--bootstrap-admin-token-file", str(path)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert again.stdout is not None
        assert again.stdout.readline().startswith("maia-controller listening on ")
        assert path.read_text().startswith("maia_")
    finally:
        again.terminate()
        assert again.wait(30) == 0


def test_a_read_only_sqlite_database_is_one_line_at_start(tmp_path: Path) -> None:
    """It said it listened, then failed its leader lease every second and every write UNAVAILABLE.
    Made read-only with `chattr +i` (file modes do not stop root); skipped where that is not allowed."""
    path = tmp_path / "maia.db"
    args = ("--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{path}", "--insecure-no-auth",
            "--log-level", "WARNING")
    first = subprocess.Popen([str(BIN), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert first.stdout is not None and first.stdout.readline().startswith("maia-controller listening on ")
    first.terminate()
    assert first.wait(30) == 0
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed here")
    try:
        proc = run_controller(tmp_path, *args)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert_refused(proc, f"the database at sqlite+aiosqlite:///{path} is read-only: attempt to write a readonly "
                         "database", "let this user write the file")
