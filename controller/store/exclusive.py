"""One controller per SQLite file: an exclusive lock on a file beside the database.

SQLite has no server to elect a leader through, and two controllers writing one file would
both schedule. The first controller holds `flock(LOCK_EX)` on `<database>.lock` for its whole
life (the kernel drops it when the process dies, even on kill -9); a second one fails to get it
and refuses to start, naming the holder's pid. Several controllers need PostgreSQL.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy.engine import make_url


class DatabaseInUse(RuntimeError):
    """Another controller holds the SQLite database."""


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other backends and in-memory databases."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return None
    return Path(database)


class SqliteLock:
    """The exclusive lock of one SQLite database file (a no-op for other databases)."""

    def __init__(self, url: str) -> None:
        path = sqlite_path(url)
        self.path = None if path is None else path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise `DatabaseInUse` saying who holds it."""
        if self.path is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            database = self.path.with_name(self.path.name.removesuffix(".lock"))
            raise DatabaseInUse(
                f"another maia-controller (pid {holder}) is running on the SQLite database {database} "
                f"(it holds {self.path}); hint: SQLite takes one controller: stop the other one, or run "
                f"several controllers on PostgreSQL (--db postgresql+asyncpg://...)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused)
            self._fd = None
