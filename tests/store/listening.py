"""Taking a controller's listening connection (`store/notify.py`) away, for tests: ended by the
server as a restart or a network cut would, and kept away until the test lets it back."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from controller.store import notify
from controller.store.notify import PgChannel


def reconnections_held(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """From now on a listening connection (named `notify.APPLICATION_NAME`) connects only once the
    returned event is set; other connections (the pools') are not held."""
    allowed = asyncio.Event()
    connect = asyncpg.connect

    async def held(*args: Any, **kw: Any) -> Any:
        if (kw.get("server_settings") or {}).get("application_name") == notify.APPLICATION_NAME:
            await allowed.wait()
        return await connect(*args, **kw)

    monkeypatch.setattr(asyncpg, "connect", held)
    return allowed


async def end_listening_connection(url: str, channel: PgChannel) -> None:
    """The server ends `channel`'s listening connection (`pg_terminate_backend`, as a restart or a
    failover would); returns once its channel knows (that connection is closed)."""
    ended = channel._conn
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", ended.get_server_pid())
    finally:
        await conn.close()
    async with asyncio.timeout(10.0):
        while not ended.is_closed():  # (the channel may have connected again already)
            await asyncio.sleep(0.01)
