"""End to end with real simulated nodes (`maia-simnode` subprocesses): place, run, cordon,
drain, lose a node, watch, delete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from grpc_harness import PENDING, RUNNING, SimFleet, Stubs, eventually, issue_token, running_fleet, spec
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

RACKS = {"rack-00": "row-a", "rack-01": "row-a", "spa-00": "row-b", "spb-00": "row-b"}


async def _get(stubs: Stubs, name: str) -> deployments_pb2.Deployment:
    return await stubs.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name=name))


async def _submit(stubs: Stubs, msg: deployments_pb2.DeploymentSpec) -> None:
    await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=msg))


async def _nodes(stubs: Stubs) -> dict[str, admin_pb2.Node]:
    return {n.id: n for n in (await stubs.admin.ListNodes(admin_pb2.ListNodesRequest())).nodes}


@pytest.fixture
async def fleet(stubs: Stubs, controller_app, tmp_path: Path) -> AsyncIterator[SimFleet]:
    """Topology, tenant `lab`, and 2 racks x 4 nodes of real agents, all connected and ready."""
    async with running_fleet(stubs, controller_app, tmp_path, RACKS) as sim:
        yield sim


async def test_submit_runs_on_concrete_accelerators_and_delete_frees_them(stubs: Stubs, fleet: SimFleet):
    watch = stubs.deployments.WatchDeployments(deployments_pb2.WatchDeploymentsRequest(name="svc"))
    await _submit(stubs, spec("svc", replicas=2, shards=2, accelerators=2))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    assert running.placed_replicas == 2 and running.running_replicas == 2
    slots = [(p.node, i) for p in running.placements for i in p.accelerator_indices]
    assert len(running.placements) == 4 and len(slots) == 8 and len(set(slots)) == 8
    for replica in (0, 1):  # rack-local gangs
        assert len({p.rack for p in running.placements if p.replica == replica}) == 1
    listed = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest(tenant="lab"))
    assert [d.spec.name for d in listed.deployments] == ["svc"]
    tenant = await stubs.admin.GetTenant(admin_pb2.GetTenantRequest(id="lab"))
    assert tenant.used_accelerators == 8.0 and tenant.used_power_w == pytest.approx(8 * 400.0)
    summary = await stubs.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest())
    assert summary.nodes_ready == 8 and summary.accelerators_used == 8.0
    assert summary.deployments_by_phase["running"] == 1

    # Watch: the initial state, then the changes up to running.
    events = []
    async for event in watch:
        events.append(event)
        if event.deployment.phase == RUNNING:
            break
    assert events[0].type == deployments_pb2.DeploymentEvent.TYPE_ADDED
    assert all(e.deployment.spec.name == "svc" for e in events)
    watch.cancel()

    # Power: idle of the 8 nodes (600 W each) + 8 loaded accelerators x 400 W, all in row-a.
    topo = await stubs.admin.GetTopology(admin_pb2.GetTopologyRequest())
    racks = {r.id: r for r in topo.racks}
    assert racks["rack-00"].power_used_w + racks["rack-01"].power_used_w == pytest.approx(8 * 600 + 8 * 400)
    assert {r.id: r.power_used_w for r in topo.rows}["row-a"] == pytest.approx(8 * 600 + 8 * 400)
    assert racks["rack-00"].nodes == 4 and racks["spa-00"].nodes == 0

    await stubs.deployments.DeleteDeployment(deployments_pb2.DeleteDeploymentRequest(name="svc"))
    await eventually(lambda: stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest()),
                     lambda r: not r.deployments, what="svc removed")
    nodes = await _nodes(stubs)
    assert sum(n.accelerators_used for n in nodes.values()) == 0.0
    # The agents were sent sets without the shards and stopped them (as their log says).
    shards = {f"svc/{p.replica}/{p.shard} stopped" for p in running.placements}

    async def log_text() -> str:
        return fleet.log_path.read_text(errors="replace")

    await eventually(log_text, lambda text: all(s in text for s in shards), what="agents stopped svc's shards")
    # Freed capacity is usable again: a gang as large as a whole rack fits.
    await _submit(stubs, spec("whole-rack", shards=4, accelerators=4))
    await eventually(lambda: _get(stubs, "whole-rack"), lambda d: d.phase == RUNNING, what="whole-rack running")


async def test_unplaceable_stays_pending_with_reasons(stubs: Stubs, fleet: SimFleet):
    # Each replica needs a whole rack (16 accelerators); three replicas cannot fit two racks.
    await _submit(stubs, spec("huge", replicas=3, min_replicas=3, shards=4, accelerators=4))
    pending = await eventually(lambda: _get(stubs, "huge"), lambda d: len(d.reasons) > 0, what="reasons")
    assert pending.phase == PENDING and not pending.placements
    assert all(r.code and r.message for r in pending.reasons)
    assert (await _get(stubs, "huge")).phase == PENDING  # a later read: still pending


async def test_dry_run_writes_nothing(stubs: Stubs, fleet: SimFleet):
    before = await stubs.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest())
    reply = await stubs.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("maybe", replicas=2, shards=2, accelerators=2), dry_run=True))
    assert reply.dry_run and reply.deployment.placed_replicas == 2
    assert len(reply.deployment.placements) == 4
    assert all(p.node and p.rack and p.accelerator_indices for p in reply.deployment.placements)
    listed = await stubs.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest())
    assert not listed.deployments
    after = await stubs.admin.GetClusterSummary(admin_pb2.GetClusterSummaryRequest())
    assert after.accelerators_used == before.accelerators_used == 0.0


async def test_cordon_keeps_new_work_off_and_drain_moves_it(stubs: Stubs, fleet: SimFleet):
    for node_id in fleet.node_ids[:4]:  # all of rack-00
        node = await stubs.admin.CordonNode(admin_pb2.NodeRequest(id=node_id))
        assert node.state == common_pb2.NODE_STATE_CORDONED
    await _submit(stubs, spec("svc", replicas=2, shards=1, accelerators=4, locality=common_pb2.DOMAIN_NODE))
    running = await eventually(lambda: _get(stubs, "svc"), lambda d: d.phase == RUNNING, what="svc running")
    assert {p.rack for p in running.placements} == {"rack-01"}

    for node_id in fleet.node_ids[:4]:
        node = await stubs.admin.UncordonNode(admin_pb2.NodeRequest(id=node_id))
        assert node.state == common_pb2.NODE_STATE_READY
    victim = running.placements[0].node
    drained = await stubs.admin.DrainNode(admin_pb2.NodeRequest(id=victim))
    assert drained.state == common_pb2.NODE_STATE_CORDONED
    moved = await eventually(
        lambda: _get(stubs, "svc"),
        lambda d: d.phase == RUNNING and len(d.placements) == 2 and victim not in {p.node for p in d.placements},
        what="svc re-placed off the drained node")
    assert victim not in {p.node for p in moved.placements}
    assert (await stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=victim))).shards == 0


async def test_lost_node_gets_its_shards_placed_again(stubs: Stubs, controller_app, tmp_path: Path,
                                                      fleet: SimFleet):
    # Two one-node fleets of a model nobody else has, in separate processes, so one can be killed.
    bootstrap = await issue_token(controller_app.db, "node-bootstrap", name="spares")
    spares = [SimFleet(controller_app.address, racks=1, nodes_per_rack=1, rack_prefix=p, model="maia-200",
                       token=bootstrap, log_dir=tmp_path) for p in ("spa-", "spb-")]
    try:
        await eventually(lambda: _nodes(stubs),
                         lambda ns: all(ns.get(i) and ns[i].connected for s in spares for i in s.node_ids),
                         what="spare agents connected")
        await _submit(stubs, spec("special", shards=1, accelerators=4, locality=common_pb2.DOMAIN_NODE,
                                  models=("maia-200",)))
        running = await eventually(lambda: _get(stubs, "special"), lambda d: d.phase == RUNNING, what="running")
        first = running.placements[0].node
        victim = next(s for s in spares if first in s.node_ids)
        victim.kill()
        await eventually(lambda: stubs.admin.GetNode(admin_pb2.GetNodeRequest(id=first)),
                         lambda n: n.state == common_pb2.NODE_STATE_DOWN, what="victim down")
        again = await eventually(
            lambda: _get(stubs, "special"),
            lambda d: d.phase == RUNNING and d.placements and d.placements[0].node != first,
            what="re-placed and running on the other spare")
        assert again.placements[0].node.startswith(("spa-", "spb-"))
    finally:
        for s in spares:
            await s.stop()


async def test_a_fleets_stop_lets_the_controller_on_the_tests_loop_end_its_streams(stubs: Stubs, controller_app,
                                                                                   tmp_path: Path):
    """`SimFleet.stop` waits for the process off the event loop: the in-process controller ends
    each agent's stream as the agent half-closes it, before the fleet has exited. (A wait that
    blocked the loop left the controller deaf until every agent gave up its stream on its own,
    `STOP_GRACE_S` later.)"""
    async with running_fleet(stubs, controller_app, tmp_path, {"rack-00": "row-a"}, nodes_per_rack=2) as sim:
        open_streams: list[int] = []
        stopping = asyncio.ensure_future(sim.stop())
        while not stopping.done():  # every turn of the loop until the process has exited
            open_streams.append(len(controller_app.hub.connected()))
            await asyncio.sleep(0)
        await stopping
        assert open_streams[0] == 2 and open_streams[-1] == 0, open_streams
