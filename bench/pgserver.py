"""A throwaway PostgreSQL server for the tests and the benchmarks (no Docker here).

Started from the local PostgreSQL 15 binaries in a temp dir, on a free port with trust auth and
durability off; databases in it are created from a template in milliseconds. `tests/conftest.py`
runs one per test session; `bench e2e` and `bench failover` run their own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench import procfs

PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin")
PG_USER = "app"


def find_pg_bin_dir() -> Path | None:
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """A throwaway PostgreSQL cluster in a temp dir (run as `postgres` when we are root)."""

    def __init__(self, bin_dir: Path, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = bin_dir
        self.settings = dict(settings or {})  # more `-c name=value` server settings (the bench's probes)
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
            + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        )
        last_error = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            started = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", f"{opts} -p {self.port}",
                "-w", "-t", "60", "start",
            )
            if started.returncode == 0:
                return f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{self.port}/postgres"
            last_error = f"{started.stderr or started.stdout}\n{self._log_tail()}"
            time.sleep(0.2)
        raise RuntimeError(f"pg_ctl start failed: {last_error}")

    def postmaster_pid(self) -> int | None:
        """The running server's postmaster (None: not running)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_s(self) -> float:
        """CPU seconds of the server so far: the postmaster's, its live children's (the backends,
        the writers) and those of the children it has reaped (/proc; 0.0 when not running)."""
        pid = self.postmaster_pid()
        try:
            return 0.0 if pid is None else procfs.tree_cpu_s(pid)
        except (OSError, ValueError, IndexError):
            return 0.0

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# How to connect to the server: `asyncpg.connect` unless a caller passes its own (the test
# fixtures, working on a thread of their own, pass the one they took before any test could
# monkeypatch `asyncpg.connect`).
Connect = Callable[[str], Awaitable[Any]]


async def create_database(server_url: str, template: str | None = None, prefix: str = "maia_test", *,
                          connect: Connect | None = None) -> str:
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    conn = await (connect or asyncpg.connect)(asyncpg_dsn(server_url))
    try:
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        if conn.get_server_version().major >= 15:
            # 15's default (WAL_LOG) copies block by block through the WAL: ~15x slower here.
            sql += " STRATEGY = FILE_COPY"
        await conn.execute(sql)
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, db_url: str, *, connect: Connect | None = None) -> None:
    import asyncpg

    name = make_url(db_url).database
    conn = await (connect or asyncpg.connect)(asyncpg_dsn(server_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
