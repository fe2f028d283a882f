"""A database that fails under a call: the caller is told UNAVAILABLE with a retry time and that
its write may have landed (never INTERNAL, which says "a bug, do not retry"), and the controller
serves again once the pool has replaced the lost connections."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

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
