"""`maia-simnode`'s nodes (in-process `SimulatedNode`s) against a real controller: what a node does
with each end of its stream the controller makes (controller/simnode/transport.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from controller.api.server import ControllerApp
from controller.simnode.credentials import CredentialFile
from controller.simnode.protocol import NodeSpec
from controller.simnode.transport import Backoff, SimulatedNode
from grpc_harness import TEST_CONFIG, Stubs, admin_token_of, eventually, issue_token, running_controller, topology
from maia.v1 import admin_pb2
from tests.addresses import closed_port_address

SPEC = NodeSpec("rack-a-n0", "rack-a")


@asynccontextmanager
async def _running(node: SimulatedNode) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(node.run())
    try:
        yield task
    finally:
        node.stop()
        await asyncio.wait_for(task, timeout=10)


async def _until(condition, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.05)


async def test_a_node_superseded_by_a_second_agent_of_it_gives_way_instead_of_taking_it_back(
        migrated_db_url: str, tmp_path: Path) -> None:
    """Two agents run for one node (--insecure-no-auth: nothing refuses the second's Register):
    the first, its stream superseded, stops reconnecting; the second keeps the node. (Told OK as
    before, the first registered again, superseding the second, which did the same, and so on.)"""
    app = ControllerApp(replace(TEST_CONFIG, db_url=migrated_db_url, insecure_no_auth=True, heartbeat_timeout_s=10))
    await app.start()
    try:
        stubs = Stubs.connect(app.address, None)
        await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
        await stubs.channel.close()
        first = SimulatedNode(SPEC, app.address, backoff=Backoff(initial_s=0.05, maximum_s=0.2))
        second = SimulatedNode(SPEC, app.address, backoff=Backoff(initial_s=0.05, maximum_s=0.2))
        async with _running(first):
            await _until(lambda: first.connected and SPEC.node_id in app.hub.connected(), "the first connected")
            async with _running(second):
                await _until(lambda: first.superseded, "the first gave way")
                await asyncio.sleep(2.0)  # what a fight would take: many sessions each
                assert (first.sessions, second.sessions) == (1, 1)
                assert second.connected and app.hub._sessions[SPEC.node_id].session_id == second.session_id
                first.revive()  # an operator's choice: it takes the node back, and the second gives way
                await _until(lambda: second.superseded and first.connected, "the revived first holds the node")
    finally:
        await app.stop(grace_s=1.0)


async def test_a_deleted_node_registers_again_with_its_bootstrap_token_at_once(migrated_db_url: str, tmp_path: Path) -> None:
    """Its stream ends NOT_FOUND: the node forgets its revoked credential and registers with its
    bootstrap token, without a Register refused for that credential first."""
    async with running_controller(migrated_db_url, tmp_path, heartbeat_timeout_s=10) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            bootstrap = await issue_token(app.db, "node-bootstrap", name="fleet")
            node = SimulatedNode(SPEC, app.address, token=bootstrap,
                                 node_credentials=CredentialFile(tmp_path / "credentials.json"),
                                 backoff=Backoff(initial_s=0.05, maximum_s=0.2))
            async with _running(node):
                await _until(lambda: node.connected and SPEC.node_id in app.hub.connected(), "the node connected")
                credential = node.node_credential
                await stubs.admin.DeleteNode(admin_pb2.NodeRequest(id=SPEC.node_id))
                await _until(lambda: node.sessions == 2 and SPEC.node_id in app.hub.connected(),
                             "the node registered again")
                assert node.node_credential not in (None, credential)
                assert dict(node.register_failures) == {}  # never tried its revoked credential
                await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=SPEC.node_id)),
                                 lambda n: n.connected, what="the node back")
        finally:
            await stubs.channel.close()


async def test_a_node_whose_stream_ended_silent_connects_again_to_the_same_controller(
        migrated_db_url: str, tmp_path: Path) -> None:
    """Ended for its silence (UNAVAILABLE with a retry time), a node given several controllers
    comes back to the one that ended it (it leads), not the next in its list (none listens there)."""
    async with running_controller(migrated_db_url, tmp_path) as app:
        stubs = Stubs.connect(app.address, admin_token_of(app))
        try:
            await stubs.admin.ApplyTopology(topology({"rack-a": "row-a"}))
            bootstrap = await issue_token(app.db, "node-bootstrap", name="fleet")
            node = SimulatedNode(SPEC, f"{app.address},{closed_port_address()}", token=bootstrap,
                                 backoff=Backoff(initial_s=5.0, maximum_s=5.0))
            async with _running(node):
                await _until(lambda: node.connected and SPEC.node_id in app.hub.connected(), "the node connected")
                node.heartbeat_delay_s = 5.0  # silent past the test controller's 2 s timeout
                await _until(lambda: node.sessions == 2 or node.controller != app.address, "the stream ended",
                             timeout=15)
                node.heartbeat_delay_s = 0.0
                assert node.controller == app.address
                await _until(lambda: node.connected and SPEC.node_id in app.hub.connected(), "the node back")
        finally:
            await stubs.channel.close()
