"""Controllers on one PostgreSQL tell each other what changed (`store/notify.py`): the messages a
controller queues in one turn of its event loop reach the others in order, in one round trip, a
kind's consecutive messages merged; a controller ignores its own; long ones are split."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from controller.store.db import Database
from controller.store.notify import PAYLOAD_MAX, PgChannel

POSTGRES_ONLY = pytest.mark.parametrize("db_backend", [pytest.param("postgres", marks=pytest.mark.postgres)])


async def _listening(url: str, sender: str, heard: list[tuple[str, str]]) -> tuple[PgChannel, asyncio.Task]:
    channel = PgChannel(url, sender, lambda kind, data: heard.append((kind, data)))
    task = asyncio.create_task(channel.run())
    assert await channel.wait_ready(10.0)
    return channel, task


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@POSTGRES_ONLY
async def test_messages_queued_in_one_turn_arrive_in_order_in_one_round_trip(database: Database,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    heard_a: list[tuple[str, str]] = []
    heard_b: list[tuple[str, str]] = []
    a, a_task = await _listening(database.url, "a", heard_a)
    b, b_task = await _listening(database.url, "b", heard_b)
    notifies: list[str] = []
    execute = asyncpg.Connection.execute

    async def counted(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        if self is a._conn and "pg_notify" in query:
            notifies.append(query)
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "execute", counted)
    try:
        a.send("wake")
        a.send("deployments", ["added:t/x"])
        a.send("deployments", ["added:t/y", "deleted:t/z"])
        a.send("nodes", ["n1"])
        a.send("released")
        await _until(lambda: len(heard_b) >= 4)
        await asyncio.sleep(0.2)  # nothing more comes
        assert heard_b == [("wake", ""), ("deployments", "added:t/x,added:t/y,deleted:t/z"), ("nodes", "n1"),
                           ("released", "")]
        assert len(notifies) == 1
        assert heard_a == []  # its own messages are ignored
    finally:
        for channel, task in ((a, a_task), (b, b_task)):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()


@POSTGRES_ONLY
async def test_messages_sent_while_others_are_on_their_way_follow_them_and_long_ones_are_split(
        database: Database) -> None:
    heard: list[tuple[str, str]] = []
    a, a_task = await _listening(database.url, "a", [])
    b, b_task = await _listening(database.url, "b", heard)
    try:
        items = [f"modified:tenant/deployment-{i:05d}" for i in range(2 * PAYLOAD_MAX // 30)]
        a.send("deployments", items)
        await asyncio.sleep(0)  # the first flush is under way
        a.send("wake")
        a.send("deployments", ["added:t/last"])
        await _until(lambda: heard and heard[-1] == ("deployments", "added:t/last"))
        kinds = [kind for kind, _ in heard]
        assert kinds[-2:] == ["wake", "deployments"] and set(kinds[:-2]) == {"deployments"} and len(kinds) >= 4
        assert [item for _, data in heard[:-2] for item in data.split(",")] == items
        assert all(len(f"deployments|a|{data}".encode()) <= PAYLOAD_MAX for _, data in heard)
    finally:
        for channel, task in ((a, a_task), (b, b_task)):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()
