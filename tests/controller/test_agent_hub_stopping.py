"""A Connect whose hello comes once the hub's `close_all` began (the controller is stopping) is
refused UNAVAILABLE with no session opened: nobody would close that session (it would be cut only
when the server's grace ends), and its agent should go to the next leader now."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from controller.agents import AgentHub, AgentInbound
from controller.errors import Unavailable
from controller.store import repositories as repo
from controller.store.db import Database
from uc_builders import WHO, statements

NODE = "rack-a-n0"  # the `cluster` fixture's, up


def _hub(db: Database) -> AgentHub:
    return AgentHub(db, heartbeat_timeout_s=60, on_liveness_change=lambda: None,
                    on_deployments_changed=lambda views: asyncio.sleep(0))


async def _session_of(db: Database, node_id: str) -> str:
    async with db.unit_of_work() as uow:
        return (await repo.node_rows_by_id(uow.session, [node_id]))[node_id].session_id


async def _silent() -> AsyncIterator[AgentInbound]:
    return
    yield


async def test_a_hello_after_close_all_is_refused_with_nothing_written(cluster):
    hub = _hub(cluster)
    session_id = await _session_of(cluster, NODE)
    hub.close_all()
    with statements(cluster) as seen, pytest.raises(Unavailable, match="controller is stopping"):
        await anext(hub.converse(WHO, NODE, session_id, _silent()))
    assert seen == []
    assert hub.connected() == frozenset()


async def test_a_hello_written_while_close_all_began_opens_no_session(cluster, monkeypatch):
    hub = _hub(cluster)
    session_id = await _session_of(cluster, NODE)
    write_hello = hub._hello

    async def stopped_meanwhile(hello):  # noqa: ANN001
        changed = await write_hello(hello)
        hub.close_all()  # the stop began while the hello was being written
        return changed

    monkeypatch.setattr(hub, "_hello", stopped_meanwhile)
    with pytest.raises(Unavailable, match="controller is stopping"):
        await anext(hub.converse(WHO, NODE, session_id, _silent()))
    assert hub.connected() == frozenset()
