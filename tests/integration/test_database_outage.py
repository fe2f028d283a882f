"""A database that fails under a call: the caller is told UNAVAILABLE with a retry time and that
its write may have landed (never INTERNAL, which says "a bug, do not retry"; no google.rpc.RetryInfo,
which says "call again as it is"), and the controller serves again once the pool has replaced the
lost connections. A call whose transaction the database aborted for another's (a deadlock's victim)
is told ABORTED with a retry time and RetryInfo, nothing written: maiactl makes it again and lands."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from controller.api.server import ControllerApp
from controller.cli.client import rpc_error_text
from controller.cli.main import main as maiactl
from controller.ratelimit import RETRY_AFTER_METADATA_KEY
from grpc_harness import Stubs, admin_token_of
from maia.v1 import admin_pb2

T = TypeVar("T")

pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])

ATTEMPTS = 20
# How long an attempt waits for the call to hold isolation_state while it waits for the generation's
# row. It may never: a background writer (a generation bump, behind the transaction's row) queued
# first keeps the call behind the generation writers' lock, holding nothing; the attempt is then
# given up (the transaction rolled back, the call lands) and the next one tried.
WAIT_HOLDING_S = 5.0


async def _end_the_controllers_connections(migrated_db_url: str) -> int:
    """pg_terminate_backend every other connection to the controller's database (as a server
    restart or a failover would); how many were ended."""
    engine = create_async_engine(migrated_db_url)
    try:
        async with engine.connect() as conn:
            return len((await conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"))).all())
    finally:
        await engine.dispose()


async def test_a_lost_database_connection_is_unavailable_with_a_retry_time(controller_app: ControllerApp,
                                                                           stubs: Stubs) -> None:
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-first"))  # the pool holds live connections
    refused: grpc.aio.AioRpcError | None = None
    # The controller's own loops (reconciler, lifecycle) may meet a lost connection first and have
    # the pool replaced before the call gets one: end them again until a call meets one.
    for attempt in range(ATTEMPTS):
        assert await _end_the_controllers_connections(controller_app.config.db_url) > 0
        try:
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id=f"lab-{attempt}"))
        except grpc.aio.AioRpcError as exc:
            refused = exc
            break
    assert refused is not None, f"no call met a lost connection in {ATTEMPTS} attempts"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE, (refused.code(), refused.details())
    assert "database failed during the call" in refused.details() and "may have landed" in refused.details()
    assert dict(refused.trailing_metadata() or ())[RETRY_AFTER_METADATA_KEY] == "1000"
    status = rpc_status.from_call(refused)  # the controller's answer (a google.rpc.Status) ...
    assert status is not None and not status.details  # ... without RetryInfo: read before calling again
    # maiactl words it as the controller's answer, not as a controller it could not reach.
    text = rpc_error_text(refused, controller_app.address)
    assert text.startswith(f"error: UNAVAILABLE: {refused.details()}\n"), text
    assert "answered but cannot serve the call now" in text and "cannot reach" not in text
    # Served again: the pool replaced what the server ended.
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-after"))
    listed = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert "lab-after" in {t.id for t in listed.tenants}


async def test_a_read_the_database_failed_under_is_unavailable_and_may_be_made_again_as_it_is(
        controller_app: ControllerApp, stubs: Stubs) -> None:
    """A call that only reads (a List) wrote nothing, whatever became of its connection: it is told
    so, with RetryInfo ("call again as it is"), not to read before retrying what it never wrote."""
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-first"))
    refused: grpc.aio.AioRpcError | None = None
    for _ in range(ATTEMPTS):
        assert await _end_the_controllers_connections(controller_app.config.db_url) > 0
        try:
            await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
        except grpc.aio.AioRpcError as exc:
            refused = exc
            break
    assert refused is not None, f"no call met a lost connection in {ATTEMPTS} attempts"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE, (refused.code(), refused.details())
    assert "it only reads: retry it" in refused.details() and "may have landed" not in refused.details()
    [detail] = rpc_status.from_call(refused).details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry) and retry.retry_delay.ToMilliseconds() == 1000
    listed = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert "lab-first" in {t.id for t in listed.tenants}


async def _call_waits_holding_isolation(watcher: AsyncConnection) -> bool:
    """Whether a backend waits for a lock while it holds isolation_state's table for writing (it
    moved the isolation version: the call's INSERT, not a background loop's generation bump)."""
    await watcher.execute(text("SELECT pg_stat_clear_snapshot()"))  # pg_stat_activity as of now
    return bool((await watcher.execute(text(
        "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
        "WHERE a.datname = current_database() AND a.wait_event_type = 'Lock' AND l.granted "
        "AND l.relation = 'isolation_state'::regclass AND l.mode = 'RowExclusiveLock'"))).scalar_one())


async def _deadlocked(engine: AsyncEngine, create_tenant: Callable[[], Awaitable[T]]) -> T:
    """A transaction holds the cluster generation's row; `create_tenant()` makes a CreateTenant call,
    which inserts the tenant (the isolation trigger locks isolation_state's row) and waits for it; the
    transaction then asks for isolation_state's row. PostgreSQL checks a wait for a deadlock once,
    `deadlock_timeout` (a second) after it began: the call's check finds the cycle when the transaction
    waits by then (its own is a minute), and the call is the victim. Otherwise the call lands (the
    transaction asked too late and was aborted itself, or the call did not hold isolation_state within
    `WAIT_HOLDING_S` and the transaction gave up). What `create_tenant()` returned (or raised)."""
    async with engine.connect() as other, engine.connect() as watcher:
        await watcher.execution_options(isolation_level="AUTOCOMMIT")
        transaction = await other.begin()
        await other.execute(text("SET LOCAL deadlock_timeout = '60s'"))
        await other.execute(text("UPDATE cluster_state SET generation = generation WHERE id = 1"))
        call = asyncio.ensure_future(create_tenant())
        deadline = asyncio.get_running_loop().time() + WAIT_HOLDING_S
        while not (holding := await _call_waits_holding_isolation(watcher)):
            assert not call.done(), "the call ended before it waited"
            if asyncio.get_running_loop().time() > deadline:  # queued behind a background writer instead
                break
            await asyncio.sleep(0.01)
        if holding:
            try:
                await other.execute(text("SELECT id FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE"))
            except DBAPIError as exc:
                assert "deadlock detected" in str(exc)
        await transaction.rollback()
    return await asyncio.wait_for(call, 60)


async def _deadlocked_call(engine: AsyncEngine, stubs: Stubs, tenant: str) -> grpc.aio.AioRpcError | None:
    """What a CreateTenant of `tenant` made in `_deadlocked` ended with (None: it landed)."""
    try:
        await _deadlocked(engine, lambda: stubs.admin.CreateTenant(admin_pb2.Tenant(id=tenant)))
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def test_a_call_aborted_by_the_database_as_a_deadlocks_victim_is_aborted_with_a_retry_time(
        controller_app: ControllerApp, stubs: Stubs) -> None:
    """A call whose transaction PostgreSQL aborted as a deadlock's victim (SQLSTATE 40P01) reached the
    caller as INTERNAL ("a bug, do not retry"). It is ABORTED, with a retry time, saying nothing was
    written; the call retried lands."""
    engine = create_async_engine(controller_app.config.db_url)
    refused = None
    try:
        for attempt in range(ATTEMPTS):  # a loaded machine may let the call's one check pass first
            refused = await _deadlocked_call(engine, stubs, f"lab-deadlocked-{attempt}")
            if refused is not None:
                break
    finally:
        await engine.dispose()
    assert refused is not None, f"no call was a deadlock's victim in {ATTEMPTS} attempts"
    assert refused.code() == grpc.StatusCode.ABORTED, (refused.code(), refused.details())
    assert "a deadlock with a concurrent transaction" in refused.details()
    assert "nothing of it was written" in refused.details()
    assert dict(refused.trailing_metadata() or ())[RETRY_AFTER_METADATA_KEY] == "100"
    [detail] = rpc_status.from_call(refused).details  # the standard "call again as it is"
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry) and retry.retry_delay.ToMilliseconds() == 100
    listed = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert f"lab-deadlocked-{attempt}" not in {t.id for t in listed.tenants}
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id=f"lab-deadlocked-{attempt}"))


def _maiactl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = maiactl(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_maiactl_makes_a_call_that_was_a_deadlocks_victim_again_and_it_lands(
        controller_app: ControllerApp, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """`maiactl apply` of a tenant whose CreateTenant was a deadlock's victim failed ("error: ABORTED:
    ... retry the call", exit 1); its channel now makes the call again after the pause the answer's
    RetryInfo asks for, and the tenant is created (exit 0)."""
    at = ("--controller", controller_app.address, "--token", admin_token_of(controller_app))
    engine = create_async_engine(controller_app.config.db_url)
    caplog.set_level(logging.WARNING, logger="maia.api")
    victim = "the database aborted a transaction of /maia.v1.AdminService/CreateTenant"
    try:
        for attempt in range(ATTEMPTS):  # a loaded machine may let the call's one check pass first
            manifest = tmp_path / f"tenant-{attempt}.yaml"
            manifest.write_text(f"kind: Tenant\nid: lab-cli-{attempt}\n")
            caplog.clear()
            code, out, err = await _deadlocked(engine, lambda: asyncio.to_thread(
                _maiactl, capsys, "apply", "-f", str(manifest), *at))
            assert (code, out) == (0, f"tenant/lab-cli-{attempt} created\n"), err
            if any(victim in r.getMessage() for r in caplog.records):
                break
    finally:
        await engine.dispose()
    assert any(victim in r.getMessage() for r in caplog.records), f"no call was a deadlock's victim in {ATTEMPTS} attempts"
