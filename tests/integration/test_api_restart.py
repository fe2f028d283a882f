"""A controller restart on the same database: agents reconnect, nothing is re-placed; a node whose
Hello the restarted controller is writing when its restart grace ends is left to that Hello."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from controller.api.server import ControllerApp
from controller.config import Config
from controller.store import models as m
from grpc_harness import (
    RUNNING, HandAgent, SimFleet, Stubs, admin_token_of, controller_with_rack, eventually, issue_token,
    running_controller, spec, topology,
)
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


def _config(migrated_db_url: str, listen: str, token_file: Path) -> Config:
    return Config(listen=listen, db_url=migrated_db_url, reconcile_interval_s=0.2, heartbeat_timeout_s=3.0,
                  solve_time_limit_ms=1000, bootstrap_admin_token_file=str(token_file))


async def _running(stubs: Stubs) -> deployments_pb2.Deployment:
    return await eventually(
        lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="svc")),
        lambda d: d.phase == RUNNING, what="svc running")


async def test_restart_keeps_placements_and_agents_reconnect(migrated_db_url: str, tmp_path: Path):
    token_file = tmp_path / "admin.token"
    first = ControllerApp(_config(migrated_db_url, "127.0.0.1:0", token_file))
    address = await first.start()
    token = token_file.read_text().strip()
    fleet = SimFleet(address, racks=1, nodes_per_rack=2, token=await issue_token(first.db, "node-bootstrap"),
                     log_dir=tmp_path)
    second: ControllerApp | None = None
    try:
        async with Stubs.connect(address, token).channel as channel:
            stubs = Stubs.on(channel)
            await stubs.admin.ApplyTopology(topology({"rack-00": "row-a"}))
            await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
            await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                             lambda r: sum(n.connected for n in r.nodes) == 2, what="agents connected")
            await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
                spec=spec("svc", replicas=2, accelerators=4, locality=common_pb2.DOMAIN_NODE)))
            before = await _running(stubs)
        await first.stop(grace_s=0.5)

        second = ControllerApp(_config(migrated_db_url, address, token_file))  # same port: the agents know only this one
        await second.start()
        assert token_file.read_text().strip() == token  # an admin token exists: the file is left alone
        async with Stubs.connect(address, token).channel as channel:
            stubs = Stubs.on(channel)
            nodes = await eventually(lambda: stubs.admin.ListNodes(admin_pb2.ListNodesRequest()),
                                     lambda r: sum(n.connected for n in r.nodes) == 2, timeout=30,
                                     what="agents reconnected")
            assert all(n.state == common_pb2.NODE_STATE_READY for n in nodes.nodes)
            after = await _running(stubs)
        assert [(p.node, list(p.accelerator_indices)) for p in after.placements] == \
               [(p.node, list(p.accelerator_indices)) for p in before.placements]
        assert after.generation == before.generation  # nothing was placed again
    finally:
        await fleet.stop()
        if second is not None:
            await second.stop(grace_s=0.5)
        else:
            await first.stop(grace_s=0.5)


async def _greeting(app: ControllerApp, node_id: str, timeout_s: float = 20.0) -> None:
    """Until the hub is writing the node's Hello."""
    deadline = time.monotonic() + timeout_s
    while node_id not in app.hub.greeting():
        assert time.monotonic() < deadline, f"no Hello of {node_id} under way"
        await asyncio.sleep(0.01)


async def _health(app: ControllerApp, node_id: str) -> tuple[m.NodeHealth, bool]:
    async with app.db.unit_of_work() as uow:
        node = await uow.session.get(m.Node, node_id)
        return node.health, node.evicted_at is not None


async def test_a_restarted_controller_leaves_a_node_whose_hello_it_is_writing_to_that_hello(
        migrated_db_url: str, tmp_path: Path, monkeypatch) -> None:
    """Its restart grace over (its node lifecycle's clock moved past it and the down and eviction
    graces), the controller finds the node up, its stored contact written before the restart, no
    stream holding it: its Hello is being written (held back here). The lifecycle leaves it to
    that Hello: still up, its work not evicted, whatever passes run meanwhile; then connected."""
    node_id = "node-1"
    async with controller_with_rack(migrated_db_url, tmp_path) as (_, stubs):
        session_id = (await HandAgent(stubs, node_id, "rack-a").register()).session_id
    went_at = datetime.now(timezone.utc)
    async with running_controller(migrated_db_url, tmp_path) as app:
        async with app.db.unit_of_work() as uow:  # as the old leader left it: up, heard from just before it went
            node = await uow.session.get(m.Node, node_id)
            node.health, node.evicted_at, node.last_heartbeat_at = m.NodeHealth.UP, None, went_at
            await uow.commit()
        written = asyncio.Event()
        write_hello = app.hub._hello

        async def held_back(hello):  # noqa: ANN001, ANN202
            await written.wait()
            return await write_hello(hello)
        monkeypatch.setattr(app.hub, "_hello", held_back)
        later = datetime.now(timezone.utc) + timedelta(minutes=5)
        monkeypatch.setattr(app.lifecycle, "_wall_clock", lambda: later)
        stubs = Stubs.connect(app.address, admin_token_of(app))
        agent = HandAgent(stubs, node_id, "rack-a")
        try:
            await agent.connect(session_id)
            await _greeting(app, node_id)
            for _ in range(3):  # suspect, down, evicted, a pass each, were it judged silent
                await app.lifecycle.pass_once()
            assert await _health(app, node_id) == (m.NodeHealth.UP, False)
            # Held back all along (else a stream, not the Hello under way, kept it up).
            assert node_id in app.hub.greeting() and node_id not in app.hub.connected()
            written.set()
            await agent.next_set()
            assert node_id in app.hub.connected()
        finally:
            await agent.close()
            await stubs.channel.close()
