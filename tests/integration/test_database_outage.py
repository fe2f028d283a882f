"""A database that fails under a call: the caller is told UNAVAILABLE with a retry time and that
its write may have landed (never INTERNAL, which says "a bug, do not retry"), and the controller
serves again once the pool has replaced the lost connections. A call whose transaction the database
aborted for another's (a deadlock's victim) is told ABORTED with a retry time, nothing written."""

from __future__ import annotations

import asyncio
import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from controller.api.server import ControllerApp
from controller.ratelimit import RETRY_AFTER_METADATA_KEY
from grpc_harness import Stubs
from maia.v1 import admin_pb2

pytestmark = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])

ATTEMPTS = 20


async def _end_the_controllers_connections(db_url: str) -> int:
    """pg_terminate_backend every other connection to the controller's database (as a server
    restart or a failover would); how many were ended."""
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            return len((await conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"))).all())
    finally:
        await engine.dispose()


async def test_a_lost_database_connection_is_unavailable_with_a_retry_time(controller_app: ControllerApp,
                                                                           stubs: Stubs, db_url: str) -> None:
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-first"))  # the pool holds live connections
    refused: grpc.aio.AioRpcError | None = None
    # The controller's own loops (reconciler, lifecycle) may meet a lost connection first and have
    # the pool replaced before the call gets one: end them again until a call meets one.
    for attempt in range(ATTEMPTS):
        assert await _end_the_controllers_connections(db_url) > 0
        try:
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id=f"lab-{attempt}"))
        except grpc.aio.AioRpcError as exc:
            refused = exc
            break
    assert refused is not None, f"no call met a lost connection in {ATTEMPTS} attempts"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE, (refused.code(), refused.details())
    assert "database failed during the call" in refused.details() and "may have landed" in refused.details()
    assert dict(refused.trailing_metadata() or ())[RETRY_AFTER_METADATA_KEY] == "1000"
    # Served again: the pool replaced what the server ended.
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-after"))
    listed = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert "lab-after" in {t.id for t in listed.tenants}


async def _waiting_on(engine: AsyncEngine, table: str) -> bool:
    """Whether a backend waits for a lock in a statement that names `table` (a transaction of its
    own: one reads pg_stat_activity as of its first read)."""
    async with engine.connect() as conn:
        return bool((await conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE :like"), {"like": f"%{table}%"})).scalar_one())


async def test_a_call_aborted_by_the_database_as_a_deadlocks_victim_is_aborted_with_a_retry_time(
        controller_app: ControllerApp, stubs: Stubs, db_url: str) -> None:
    """A transaction holds the cluster generation's row; CreateTenant inserts its tenant (the isolation
    trigger locks isolation_state's row) and waits for the generation's row; the transaction then asks
    for isolation_state's row. PostgreSQL aborts the call's transaction (it waited first; the other's
    `deadlock_timeout` is longer) with SQLSTATE 40P01, which reached the caller as INTERNAL ("a bug, do
    not retry"). It is ABORTED, with a retry time, saying nothing was written; the call retried lands."""
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as other:
            transaction = await other.begin()
            await other.execute(text("SET LOCAL deadlock_timeout = '60s'"))
            await other.execute(text("UPDATE cluster_state SET generation = generation WHERE id = 1"))
            call = asyncio.ensure_future(stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-deadlocked")))
            for _ in range(600):
                if await _waiting_on(engine, "UPDATE cluster_state") or call.done():
                    break
                await asyncio.sleep(0.05)
            await other.execute(text("SELECT id FROM isolation_state WHERE id = 1 FOR NO KEY UPDATE"))
            await transaction.rollback()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call, 60)
    finally:
        await engine.dispose()
    assert refused.value.code() == grpc.StatusCode.ABORTED, (refused.value.code(), refused.value.details())
    assert "a deadlock with a concurrent transaction" in refused.value.details()
    assert "nothing of it was written" in refused.value.details()
    assert dict(refused.value.trailing_metadata() or ())[RETRY_AFTER_METADATA_KEY] == "100"
    listed = await stubs.admin.ListTenants(admin_pb2.ListTenantsRequest())
    assert "lab-deadlocked" not in {t.id for t in listed.tenants}
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab-deadlocked"))
