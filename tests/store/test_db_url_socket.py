"""`--db` for PostgreSQL over a unix socket (`?host=` the socket's directory) is accepted and
works; a URL with no host at all is still refused, its hint naming both forms."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from sqlalchemy import URL, text
from sqlalchemy.engine import make_url

from controller.preflight import StartupError, check_db_url
from controller.store.db import Database


# A unix socket is PostgreSQL's.
@pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_unix_socket_url_is_accepted_and_connects(database: Database) -> None:
    url = make_url(str(database.url))
    name = f".s.PGSQL.{url.port}"
    # The test server's socket is in its own directory (`bench.pgserver.LocalPostgres`, "maia-pg-*"
    # in the temp dir): one level, never a walk of the whole temp dir, whose other tests' directories
    # come and go meanwhile (a walk failed on one removed while it listed it).
    sockets = [*Path(tempfile.gettempdir()).glob(f"maia-pg-*/{name}"), *Path("/var/run/postgresql").glob(name)]
    if not sockets:
        pytest.skip(f"no unix socket of the test server (port {url.port})")
    over_socket = URL.create(url.drivername, username=url.username, password=url.password, database=url.database,
                             query={"host": str(sockets[0].parent), "port": str(url.port)})
    text_url = over_socket.render_as_string(hide_password=False)
    assert check_db_url(text_url).query["host"] == str(sockets[0].parent)  # refused: "names no host"
    socket_db = Database(text_url)
    try:
        async with socket_db.unit_of_work() as uow:
            assert await uow.session.scalar(text("SELECT inet_server_addr()")) is None  # not over TCP
    finally:
        await socket_db.dispose()


def test_a_postgres_url_with_no_host_at_all_is_refused_with_both_forms() -> None:
    with pytest.raises(StartupError) as refused:
        check_db_url("postgresql+asyncpg:///maia")
    assert "names no host" in str(refused.value) and "?host=/var/run/postgresql" in str(refused.value)
