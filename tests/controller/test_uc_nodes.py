"""Node views from the use cases (usecases/nodes.py): the stored node with what only the leader's
agent hub knows, whether its agent is connected and when it was last heard from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from controller.domain.values import NodeView
from controller.store import models as m
from controller.store.db import Database, UnitOfWork
from controller.usecases import nodes
from controller.usecases.ports import RecordingSignals
from uc_builders import WHO

HEARD, BEHIND, SILENT = "rack-a-n0", "rack-a-n1", "rack-b-n0"
Read = Callable[[UnitOfWork, frozenset[str] | None, Mapping[str, datetime]], Awaitable[NodeView]]


async def _listed(uow: UnitOfWork, connected: frozenset[str] | None, heard: Mapping[str, datetime],
                  node_id: str) -> NodeView:
    page = await nodes.list_nodes(uow, WHO, connected, heard)
    return next(v for v in page.items if v.info.node_id == node_id)


READS: dict[str, Callable[[str], Read]] = {
    "get": lambda node_id: lambda uow, c, h: nodes.get_node(uow, WHO, node_id, c, h),
    "list": lambda node_id: lambda uow, c, h: _listed(uow, c, h, node_id),
    "cordon": lambda node_id: lambda uow, c, h: nodes.cordon_node(uow, WHO, node_id, RecordingSignals(), c, h),
    "uncordon": lambda node_id: lambda uow, c, h: nodes.uncordon_node(uow, WHO, node_id, RecordingSignals(), c, h),
    "drain": lambda node_id: lambda uow, c, h: nodes.drain_node(uow, WHO, node_id, RecordingSignals(), c, h),
}


async def _stored(db: Database, node_id: str) -> datetime:
    async with db.unit_of_work() as uow:
        stored = (await nodes.get_node(uow, WHO, node_id, frozenset(), {})).last_heartbeat
    assert stored is not None  # said Hello (uc_builders.add_nodes)
    return stored if stored.tzinfo is not None else stored.replace(tzinfo=timezone.utc)


@pytest.mark.parametrize("use_case", sorted(READS))
async def test_a_node_view_shows_the_later_of_its_stored_last_heartbeat_and_the_hubs(
        cluster: Database, use_case: str) -> None:
    """The hub's time where it is later (the stored one is written only every few heartbeat
    timeouts while a stream lives), the stored one where the hub's is older or it has none."""
    stored = {node_id: await _stored(cluster, node_id) for node_id in (HEARD, BEHIND, SILENT)}
    heard = {HEARD: stored[HEARD] + timedelta(seconds=25), BEHIND: stored[BEHIND] - timedelta(seconds=25)}
    seen = {}
    for node_id in (HEARD, BEHIND, SILENT):
        async with cluster.unit_of_work() as uow:
            seen[node_id] = await READS[use_case](node_id)(uow, frozenset({HEARD, BEHIND}), heard)
    assert {n: v.last_heartbeat.replace(tzinfo=v.last_heartbeat.tzinfo or timezone.utc) for n, v in seen.items()} == {
        HEARD: heard[HEARD], BEHIND: stored[BEHIND], SILENT: stored[SILENT]}
    assert {n: v.connected for n, v in seen.items()} == {HEARD: True, BEHIND: True, SILENT: False}


@pytest.mark.parametrize("use_case", sorted(READS))
async def test_on_a_follower_a_node_is_connected_as_the_leader_stored_it(cluster: Database, use_case: str) -> None:
    """A follower's hub holds no agent streams (`connected` None): every node read as not
    connected there, so `maiactl wait nodes --connected` through a follower never ended. A node
    is connected as stored: its health UP (the leader marks it suspect when its stream ends)."""
    async with cluster.unit_of_work() as uow:  # SILENT's stream ended: the leader marked it suspect
        await uow.session.execute(update(m.Node).where(m.Node.id == SILENT).values(health=m.NodeHealth.SUSPECT))
        await uow.commit()
    seen = {}
    for node_id in (HEARD, SILENT):
        async with cluster.unit_of_work() as uow:
            seen[node_id] = (await READS[use_case](node_id)(uow, None, {})).connected
    assert seen == {HEARD: True, SILENT: False}


async def test_a_cordon_a_drain_and_an_eviction_show_whatever_the_nodes_health(cluster: Database) -> None:
    """A node's one state word says cordoned of an up node only: a cordon on a suspect or down
    node (it takes no new shards once back) showed nowhere, nor did an eviction (it comes back
    empty); the view carries them apart, and maiactl shows them (`views.node_flags`)."""
    from controller.cli.views import node_detail, node_flags, nodes_table
    from controller.api.convert import node_msg

    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Node).where(m.Node.id == SILENT).values(health=m.NodeHealth.SUSPECT))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        view = await nodes.cordon_node(uow, WHO, SILENT, RecordingSignals(), frozenset(), {})
    assert (view.state, view.cordoned, view.draining, view.evicted) == ("suspect", True, False, False)
    msg = node_msg(view)
    assert node_flags(msg) == ["cordoned"] and "suspect (cordoned)" in node_detail(msg)
    assert "cordoned" in nodes_table([msg], wide=True).splitlines()[1]
    async with cluster.unit_of_work() as uow:
        await uow.session.execute(update(m.Node).where(m.Node.id == SILENT).values(
            health=m.NodeHealth.DOWN, evicted_at=datetime.now(timezone.utc)))
        await uow.commit()
    async with cluster.unit_of_work() as uow:
        view = await nodes.drain_node(uow, WHO, SILENT, RecordingSignals(), frozenset(), {})
    assert (view.state, view.cordoned, view.draining, view.evicted) == ("down", True, True, True)
    assert node_flags(node_msg(view)) == ["cordoned", "draining", "evicted"]
    async with cluster.unit_of_work() as uow:
        up = await nodes.drain_node(uow, WHO, HEARD, RecordingSignals(), frozenset(), {})
    assert up.state == "cordoned" and node_flags(node_msg(up)) == ["draining"]  # the word says cordoned already


async def test_a_drain_and_an_uncordon_at_once_leave_a_state_one_of_them_asked_for(cluster: Database,
                                                                                  monkeypatch) -> None:
    """Both read the cordoned node before either wrote, and each wrote its own flag: the node was
    left uncordoned yet draining, a state neither asked for (new shards placed on it, its drain
    never done). Now the later one is decided again on what the earlier wrote."""
    node = "rack-a-n0"
    async with cluster.unit_of_work() as uow:
        await nodes.cordon_node(uow, WHO, node, RecordingSignals(), None, {})
    read, both_read = [], asyncio.Event()
    get_node = nodes.repo.get_node

    async def read_by_both(session, node_id):  # noqa: ANN001
        row = await get_node(session, node_id)
        read.append(node_id)
        if len(read) == 2:
            both_read.set()
        await asyncio.wait_for(both_read.wait(), 10)
        return row

    monkeypatch.setattr(nodes.repo, "get_node", read_by_both)

    async def call(use_case) -> NodeView:  # noqa: ANN001
        async with cluster.unit_of_work() as uow:
            return await use_case(uow, WHO, node, RecordingSignals(), None, {})

    answers = await asyncio.gather(call(nodes.drain_node), call(nodes.uncordon_node))
    async with cluster.unit_of_work() as uow:
        row = await uow.session.get(m.Node, node)
        stored = (row.cordoned, row.draining)
    assert stored in ((True, True), (False, False))  # drained then uncordoned, or uncordoned then drained
    assert stored in {(a.cordoned, a.draining) for a in answers}
