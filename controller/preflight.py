"""Checks of `--db` and the listen addresses before the controller touches anything.

A bad database URL or a busy port should cost the operator one line with a hint, not a
traceback, and should leave nothing behind: these checks run before the engine is created,
before any file is opened for writing and before a migration. `maia-controller` prints
`StartupError` as `maia-controller: <problem>; hint: <what to do>` and exits 2.
"""
from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

# The async drivers this controller ships with, and what to write instead of a sync one.
SUPPORTED_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")
_ASYNC_FOR = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
_EXAMPLES = "sqlite+aiosqlite:///maia.db or postgresql+asyncpg://user@host:5432/maia"
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class StartupError(Exception):
    """A setting that stops the controller from starting, with what to do about it."""

    problem: str
    hint: str

    def __str__(self) -> str:
        return f"{self.problem}; hint: {self.hint}"


def check_db_url(text: str) -> URL:
    """The parsed URL of `--db`, or StartupError saying what is wrong with it. Reads, never writes."""
    try:
        url = make_url(text)
    except ArgumentError:
        raise StartupError(f"--db {text!r} is not a database URL", f"use a URL such as {_EXAMPLES}") from None
    driver = url.drivername
    backend = url.get_backend_name()
    if driver not in SUPPORTED_DRIVERS:
        if backend in _ASYNC_FOR and url.get_driver_name() in ("", "pysqlite", "psycopg2", "psycopg", "pg8000"):
            fixed = url.set(drivername=_ASYNC_FOR[backend]).render_as_string(hide_password=True)
            raise StartupError(f"--db {_shown(url)} uses a synchronous driver ({driver}); the controller "
                               f"needs an async one", f"use --db {fixed}")
        raise StartupError(f"--db {_shown(url)}: unknown or unsupported driver {driver!r}",
                           f"supported: {', '.join(SUPPORTED_DRIVERS)} (e.g. {_EXAMPLES})")
    if backend == "sqlite":
        _check_sqlite_file(url)
    elif not url.host and not url.query.get("host"):  # ?host=/run/postgresql: a unix socket's directory
        raise StartupError(f"--db {_shown(url)} names no host",
                           "use postgresql+asyncpg://user@host:5432/maia, or for a unix socket "
                           "postgresql+asyncpg://user@/maia?host=/var/run/postgresql")
    return url


def _shown(url: URL) -> str:
    return repr(url.render_as_string(hide_password=True))


def _check_sqlite_file(url: URL) -> None:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise StartupError(f"--db {_shown(url)} is an in-memory SQLite database (each connection would "
                           f"see its own, and everything is lost on exit)", "name a file: sqlite+aiosqlite:///maia.db")
    path = Path(database)
    folder = path.parent.resolve() if str(path.parent) else Path.cwd()
    if not folder.is_dir():
        raise StartupError(f"--db {_shown(url)}: folder {folder} does not exist",
                           f"create it first (mkdir -p {folder}) or choose another path")
    if path.is_dir():
        raise StartupError(f"--db {_shown(url)}: {path} is a directory, not a database file",
                           f"name a file inside it, e.g. sqlite+aiosqlite:///{path / 'maia.db'}")
    if path.exists():
        try:
            with path.open("rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise StartupError(f"--db {_shown(url)}: cannot read {path}: {exc.strerror or exc}",
                               "check the file's permissions") from None
        if head and head != _SQLITE_MAGIC:
            raise StartupError(f"--db {_shown(url)}: {path} exists and is not an SQLite database",
                               "point --db at a new file or an existing maia database; this one was left untouched")


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port), or StartupError."""
    host, sep, port_text = text.rpartition(":")
    hint = f"use {flag} HOST:PORT, e.g. 127.0.0.1:50051 or 0.0.0.0:50051 (port 0: any free port)"
    if not sep or not host or not port_text.isdigit():
        raise StartupError(f"{flag} {text!r} is not HOST:PORT", hint)
    port = int(port_text)
    if port > 65535:
        raise StartupError(f"{flag} {text!r}: port {port} is out of range 0..65535", hint)
    return host.removeprefix("[").removesuffix("]"), port


# Hosts that mean every address of the machine: a port bound on one is taken on all of them.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def check_listens_apart(listens: Mapping[str, str]) -> None:
    """Refuse two of the controller's own addresses (flag -> HOST:PORT) on one port: the same
    host, or either host a wildcard. Each alone passes `check_listen`; together the second bind
    would fail only after the database was opened. Port 0 (any free port) takes no fixed one."""
    bound: dict[str, tuple[frozenset[str], int]] = {}
    for flag, text in listens.items():
        host, port = parse_listen(text, flag)
        addresses = _addresses(host)
        for other_flag, (other_addresses, other_port) in bound.items():
            if port and port == other_port and (addresses & other_addresses
                                                or WILDCARD_HOSTS & (addresses | other_addresses)):
                any_port = f"{text.rpartition(':')[0]}:0"
                raise StartupError(f"{flag} {text} and {other_flag} {listens[other_flag]} ask for the same port {port}",
                                   f"give each its own port ({flag} {any_port} picks a free one)")
        bound[flag] = (addresses, port)


def _addresses(host: str) -> frozenset[str]:
    """The addresses `host` names ("localhost" and "127.0.0.1" share one), or the host as written
    when it does not resolve (`check_listen` refuses it on its own)."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)) | {host}
    except (socket.gaierror, UnicodeError):
        return frozenset({host})


def check_listen(text: str, flag: str = "--listen") -> None:
    """Refuse a malformed address, an unknown host or a port already in use (before any DB work).

    The probe binds with SO_REUSEADDR, as gRPC does, so a port with only TIME_WAIT connections of
    a stopped controller counts as free; the server itself binds with SO_REUSEPORT off, so a
    second controller cannot share the port.
    """
    host, port = parse_listen(text, flag)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{flag} {text!r}: cannot resolve host {host!r} ({exc.strerror})",
                           "use an IP address or a name this machine resolves") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"{flag} {text}: port {port} is already in use on {host} (another "
                                   f"maia-controller or another program holds it)",
                                   f"stop that program or choose another port ({flag} {host}:0 picks a "
                                   f"free one)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise StartupError(f"{flag} {text}: {host} is not an address of this machine",
                                   "use 127.0.0.1, 0.0.0.0 or one of this machine's addresses") from None
            if exc.errno == errno.EACCES:
                raise StartupError(f"{flag} {text}: no permission to bind port {port}",
                                   "ports below 1024 need privileges; choose one above 1024") from None
            raise StartupError(f"{flag} {text}: cannot bind: {exc.strerror or exc}", "choose another address") from None
