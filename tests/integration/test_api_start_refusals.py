"""An in-process start refused for what would otherwise fail later, forever or as the wrong thing:
a SQLite database that takes no write, a metrics port taken after `preflight` found it free.
(The `maia-controller` lines these become: test_controller_startup.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import event

from controller.api.server import ControllerApp, ListenError
from controller.store.db import Database, DatabaseReadOnly
from grpc_harness import TEST_CONFIG


async def _start_refused(app: ControllerApp, refusal: type[Exception], match: str) -> None:
    """`app.start()` raises `refusal`; a start that succeeds is stopped before the test fails."""
    try:
        await app.start()
    except refusal as exc:
        assert match in str(exc)
        return
    await app.stop(grace_s=0.0)
    pytest.fail(f"the controller started; expected {refusal.__name__}")


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_read_only_sqlite_database_is_refused_at_start(database: Database) -> None:
    """It started, said SERVING, failed its leader lease every second and every write UNAVAILABLE
    (with a bootstrap token file, the token's write failed, reported as the database unreachable)."""
    app = ControllerApp(replace(TEST_CONFIG, db_url=database.url, insecure_no_auth=True))

    @event.listens_for(app.db.engine.sync_engine, "connect")
    def _read_only(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.execute("PRAGMA query_only=ON")  # SQLite answers SQLITE_READONLY, as for a read-only file

    await _start_refused(app, DatabaseReadOnly, "is read-only: attempt to write a readonly database")



@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_metrics_port_taken_after_preflight_is_a_listen_error(database: Database, tmp_path: Path,
                                                                      busy_port: int) -> None:
    """Not an OSError that `maia-controller` reported as the database's ("check that it is running")."""
    app = ControllerApp(replace(TEST_CONFIG, db_url=database.url, metrics_listen=f"127.0.0.1:{busy_port}",
                                bootstrap_admin_token_file=str(tmp_path / "admin.token")))
    await _start_refused(app, ListenError, f"cannot serve metrics on 127.0.0.1:{busy_port}")
    again = ControllerApp(replace(app.config, metrics_listen=""))  # the SQLite file was let go (its lock)
    await again.start()
    await again.stop(grace_s=0.0)


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_a_decide_process_that_cannot_start_stops_what_was_started(
        database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """What failed after the API served (the decide process, a gateway's link server, ...) left
    the server, its port and the SQLite lock held; and the spawn's OSError was said to be the
    database's ("check that it is running")."""
    from controller.preflight import StartupError
    from controller.scheduling.decider import DecideProcess

    def refused(self: DecideProcess) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(DecideProcess, "start", refused)
    app = ControllerApp(replace(TEST_CONFIG, db_url=database.url, insecure_no_auth=True, decide_process=True))
    await _start_refused(app, StartupError, "cannot start the decide process: [Errno 11] Resource temporarily")
    assert app.server is None and app.address  # stopped after it had served
    monkeypatch.undo()
    again = ControllerApp(replace(app.config, decide_process=False))  # the SQLite file was let go (its lock)
    await again.start()
    await again.stop(grace_s=0.0)
