"""Node lifecycle with real `maia-simnode` processes (test graces: down after 0.5 s of silence
more than the 2 s heartbeat timeout, work evicted after 1 s): a rack that dies has its work
placed again on the rest; a whole fleet that vanishes is not evicted and comes back to the same
layout; a second agent for a node a live stream holds is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

from controller.api.server import ControllerApp
from grpc_harness import RUNNING, SimFleet, Stubs, eventually, issue_token, spec, topology
from maia.v1 import admin_pb2, common_pb2, deployments_pb2


async def _layout(stubs: Stubs, name: str) -> dict[tuple[int, int], str]:
    d = await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name=name))
    return {(p.replica, p.shard): p.node for p in d.placements}


async def _states(stubs: Stubs) -> dict[str, int]:
    return {n.id: n.state for n in (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())).nodes}


async def _running(stubs: Stubs, name: str) -> deployments_pb2.Deployment:
    return await eventually(lambda: stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name=name)),
                            lambda d: d.phase == RUNNING, timeout=60, what=f"{name} running")


async def _setup(stubs: Stubs, app: ControllerApp, racks: dict[str, str]) -> str:
    await stubs.admin.ApplyTopology(topology(racks))
    await stubs.admin.CreateTenant(admin_pb2.Tenant(id="lab"))
    return await issue_token(app.db, "node-bootstrap", name="fleet")


async def test_a_dead_rack_has_its_work_placed_again_and_a_vanished_fleet_keeps_its_layout(
        stubs: Stubs, controller_app: ControllerApp, tmp_path: Path) -> None:
    token = await _setup(stubs, controller_app, {"a-00": "row-a", "b-00": "row-a"})
    fleets = {p: SimFleet(controller_app.address, racks=1, nodes_per_rack=2, token=token, rack_prefix=f"{p}-",
                          log_dir=tmp_path) for p in "ab"}
    try:
        await eventually(lambda: _states(stubs), lambda s: len(s) == 4 and set(s.values()) == {common_pb2.NODE_STATE_READY},
                         what="4 nodes ready")
        await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
            spec=spec("svc", replicas=2, accelerators=2, locality=common_pb2.DOMAIN_NODE)))
        await _running(stubs, "svc")
        before = await _layout(stubs, "svc")

        # Every agent gone at once (SIGKILL): nothing is up anywhere, so nothing is evicted.
        for fleet in fleets.values():
            fleet.kill()
        await eventually(lambda: _states(stubs), lambda s: set(s.values()) == {common_pb2.NODE_STATE_DOWN},
                         timeout=20, what="all nodes down")
        await eventually(lambda: _layout(stubs, "svc"), lambda layout: layout == before, timeout=5, every=1.0,
                         what="(the layout kept while down)")
        fleets = {p: SimFleet(controller_app.address, racks=1, nodes_per_rack=2, token=token, rack_prefix=f"{p}-",
                              log_dir=tmp_path) for p in "ab"}
        await _running(stubs, "svc")
        assert await _layout(stubs, "svc") == before  # back where it was: nothing reshuffled

        # One rack dies while the other lives: its replicas are evicted and placed on the living rack.
        prefix = before[(0, 0)][0]  # the rack of replica 0
        dead = {node for node in before.values() if node[0] == prefix}
        fleets[prefix].kill()
        moved = await eventually(lambda: _layout(stubs, "svc"),
                                 lambda layout: len(layout) == 2 and not set(layout.values()) & dead,
                                 timeout=30, what="replicas placed again off the dead rack")
        await _running(stubs, "svc")
        assert all(node[0] != prefix for node in moved.values())
    finally:
        for fleet in fleets.values():
            await fleet.stop()


async def test_a_second_agent_for_a_node_held_by_a_live_stream_is_refused(
        stubs: Stubs, controller_app: ControllerApp, tmp_path: Path) -> None:
    token = await _setup(stubs, controller_app, {"rack-00": "row-a"})
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    first = SimFleet(controller_app.address, racks=1, nodes_per_rack=1, token=token, log_dir=first_dir)
    second = None
    try:
        await eventually(lambda: _states(stubs), lambda s: s.get("rack-00-n00") == common_pb2.NODE_STATE_READY,
                         what="the first agent connected")
        sessions_before = await _node(stubs)
        # The same node id with the same credential (a copied state directory): refused while the
        # first holds the node, and it keeps trying with a back-off rather than taking it over.
        shutil.copytree(first_dir / "simnode-state", second_dir / "simnode-state")
        second = SimFleet(controller_app.address, racks=1, nodes_per_rack=1, token=token, log_dir=second_dir)
        await eventually(lambda: _log_count(second, "held by a live agent stream"), lambda n: n >= 2,
                         timeout=30, what="the second agent refused twice")
        node = await _node(stubs)
        assert node.connected and node.state == common_pb2.NODE_STATE_READY
        assert node.last_heartbeat.seconds >= sessions_before.last_heartbeat.seconds
    finally:
        await first.stop()
        if second is not None:
            await second.stop()


async def _node(stubs: Stubs) -> admin_pb2.Node:
    return await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id="rack-00-n00"))


async def _log_count(fleet: SimFleet, text: str) -> int:
    return fleet.log_path.read_text(errors="replace").count(text)
